"""The demo's report: report.json, report.md, the plots and the summary table printed at the end."""
from __future__ import annotations

import json
import time
from pathlib import Path


def build_report(cfg, ds, cutoff, tok, tr, st, marks, t_pub, t_inter, t_stream, fresh, raw, pub_items, pub_inter,
                 out: Path, rankable: list[float]) -> dict:
    from trainer.metrics import plot_curves, plot_results
    from trainer.prequential import summarize_after_cutoff

    preds = tr.prediction_frame()
    preds.to_parquet(out / "trainer" / "predictions.parquet")  # every prequential score, for re-analysis
    peers = list(tr.peers)
    after = summarize_after_cutoff(preds, list(cfg.models) + peers, cutoff, fit_cutoff=cutoff)
    counts = tr.learner.param_counts()
    models, peer_rows, summ = {}, {}, after.models
    for name, s in summ.items():
        row = {"auc": s["auc"], "gauc": s["gauc"], "logloss": s["logloss"], "n": s["n"], "auc_by_item_age": s["by_age"]}
        if name in counts:
            dense, sparse = counts[name]
            models[name] = {**row, "dense_params": dense, "sparse_params": sparse}
        else:
            peer_rows[name] = row
    plot_results(summ, str(out / "auc_by_item_age.png"))
    plot_curves(str(out / "trainer" / "prequential.jsonl"), str(out / "prequential_auc.png"))
    items_s = len(ds.items) / (marks["items"] - t_pub) if "items" in marks else None
    inter_s = len(ds.interactions) / (marks["interactions"] - t_inter) if "interactions" in marks else None
    t = tr.timings
    trained = tr.state.events_seen - tr.state.extra.get("skipped_trained", 0)  # the follower's, after a warm start
    warm = tr.state.extra.get("warm_start")
    return {
        "data": str(cfg.data), "cutoff": cutoff, "tokenizer_version": tok.version,
        "tokenizer": {k: tok.fit_report.get(k) for k in ("alignment", "rq", "bpe", "timings_s")},
        "models": models,
        "peers": peer_rows,  # what a user would pick instead, on the same events and PIT features
        "throughput": {
            "encoder_items_per_s": (tok.fit_report.get("encoder") or {}).get("items_per_s"),
            "pipeline_items_per_s": items_s,
            "interactions_per_s": inter_s,
            "raw_consume_per_s": raw,
            "trainer_examples_per_s": trained / t.total_s if t.total_s else None,  # every model and peer
            # each model alone: rows it scored and trained per second of its own compute
            "trainer_examples_per_s_by_model": tr.learner.examples_per_s(),
            "trainer_device": str(tr.learner.device),
            "trainer_join_share": t.join_s / t.total_s if t.total_s else None,
            "trainer_peers_share": t.peers_s / t.total_s if t.total_s else None,
        },
        "freshness_ms": _percentiles(fresh),
        "publish_to_rankable_ms": _percentiles(rankable),  # goal: p99 < 1 s
        "events": {
            "items_published": pub_items.sent, "interactions_published": pub_inter.sent,
            "items_in_fit": sum(1 for i in ds.items.values() if i.created_at < cutoff),
            "worker": {k: st.get(k) for k in ("items", "interactions")},
            "trainer_events": tr.state.events_seen, "evaluated_events": after.n_events,
            "trainer_unknown_item_rows": tr.fstats.unknown_item,
        },
        "stream_wall_s": t_stream,
        "warm_start": warm,  # trainer/warm_start.py: epochs, validation AUC per epoch, seconds, rows/s
    }


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _f(x, nd=4) -> str:
    return "—" if x is None or (isinstance(x, float) and x != x) else f"{x:.{nd}f}"


def _age_cols(report: dict) -> list[str]:
    first = next(iter(report["models"].values()))
    return list(first["auc_by_item_age"].keys())


def summary_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    ages = _age_cols(report)
    head = ["model", "AUC", "GAUC", "logloss", *[f"AUC {a}" for a in ages], "dense", "sparse"]
    rows = []
    for name, m in {**report["models"], **report.get("peers", {})}.items():
        rows.append([name if name in report["models"] else f"{name} (peer)", _f(m["auc"]), _f(m["gauc"]),
                     _f(m["logloss"]), *[_f((m["auc_by_item_age"].get(a) or {}).get("auc")) for a in ages],
                     f"{m['dense_params']:,}" if "dense_params" in m else "—",
                     f"{m['sparse_params']:,}" if "sparse_params" in m else "—"])
    return head, rows


def _percentiles(ms: list[float]) -> dict:
    """p50 / p99 of latencies in ms; None for both when nothing was probed (`--freshness-probes 0`)."""
    import numpy as np

    if not len(ms):
        return {"p50": None, "p99": None, "n": 0}
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "n": len(ms)}


def _latency(p: dict) -> str:
    return f"p50 {p['p50']:.0f} ms, p99 {p['p99']:.0f} ms" if p["n"] else "not measured (0 probes)"


def print_summary(report: dict, console) -> None:
    from rich.table import Table

    head, rows = summary_rows(report)
    t = Table(title="Prequential quality on events after the cutoff (scored before trained on)")
    for h in head:
        t.add_column(h, justify="left" if h == "model" else "right")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    tp, fr = report["throughput"], report["freshness_ms"]
    console.print(f"encoder {_f(tp['encoder_items_per_s'], 0)} items/s · pipeline {_f(tp['pipeline_items_per_s'], 0)} "
                  f"items/s · interactions {_f(tp['interactions_per_s'], 0)}/s (raw consumer "
                  f"{_f(tp['raw_consume_per_s'], 0)}/s) · trainer {_f(tp['trainer_examples_per_s'], 0)} examples/s · "
                  f"freshness {_latency(fr)}")
    rk = report["publish_to_rankable_ms"]
    console.print("publish → rankable (trm serve answers the new item with its tokens): " + _latency(rk)
                  + (f" over {rk['n']} new items" if rk["n"] else ""))
    alone = tp.get("trainer_examples_per_s_by_model") or {}
    if "trm" in alone:
        console.print(f"trm alone {alone['trm']:,.0f} examples/s (scoring + training, one thread)")
    ws = report.get("warm_start")
    if ws:
        best = ", ".join(f"{n} {e}" for n, e in ws["best_epoch"].items())
        console.print(f"warm start: {ws['n_train']:,} events, {ws['epochs']} epoch(s), {ws['total_s']:.0f} s "
                      f"(join {ws['join_s']:.0f} s); epoch kept per model: {best}")


def write_markdown(report: dict, path: Path) -> None:
    head, rows = summary_rows(report)
    lines = ["# TRM demo report", "",
             f"Data `{report['data']}`, tokenizer `{report['tokenizer_version']}`, cutoff {report['cutoff']} "
             f"({time.strftime('%Y-%m-%d', time.gmtime(report['cutoff']))}).", "",
             "## Prequential quality (events after the cutoff, each scored before it was trained on)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "![AUC by item age](auc_by_item_age.png)", "", "![Prequential AUC](prequential_auc.png)", "",
              "## Throughput and freshness", "", "```json",
              json.dumps({"throughput": report["throughput"], "freshness_ms": report["freshness_ms"],
                          "publish_to_rankable_ms": report["publish_to_rankable_ms"],
                          "events": report["events"], "warm_start": report.get("warm_start")},
                         indent=2, default=_json_default), "```", ""]
    path.write_text("\n".join(lines))
