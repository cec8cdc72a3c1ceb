"""`trm train` and `trm eval`. Heavy libraries (torch, feast, aiokafka) load only when a command runs."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_RUN = Path("runs") / "trainer"


def _models(value: str) -> list[str]:
    from trainer.models import MODEL_NAMES

    names = MODEL_NAMES if value == "all" else tuple(v.strip() for v in value.split(",") if v.strip())
    return list(names)


def _tokenizer(args):
    from trainer.assemble import TokenizerInfo, tokenizer_info
    from trm.config import tokenizer_artifact_path

    artifact = tokenizer_artifact_path(args.artifact)
    if artifact is not None:
        return tokenizer_info(artifact, args.fit_cutoff)
    if args.levels is None or args.codebook is None:
        raise SystemExit("trm train: give --artifact (or TRM_TOKENIZER_ARTIFACT), or --levels and --codebook")
    return TokenizerInfo(args.levels, args.codebook, args.tokenizer_version, args.fit_cutoff)


def _train(args) -> int:
    from rich.console import Console

    from streams.kafka_config import KafkaConfig
    from trainer.assemble import build_trainer
    from trainer.kafka_source import follow_sync
    from trainer.prequential import run_events
    from trm import quiet_third_party_warnings
    from trm.config import feast_repo_path

    quiet_third_party_warnings()
    console = Console()
    tok = _tokenizer(args)
    ck = Path(args.checkpoint_dir)
    config = {k: v for k, v in dict(d_model=args.d_model, n_blocks=args.blocks, backbone=args.backbone).items()
              if v is not None}
    tr = build_trainer(feast_repo_path(args.repo), tok, ck, _models(args.models), config,
                       dict(lr=args.lr, wide_lr=args.wide_lr, minibatch=args.minibatch,
                            epochs_per_batch=args.epochs_per_batch,
                            threads=args.threads, **({"device": args.device} if args.device else {})),
                       models_dir=args.models_dir or ck.parent / "models", publish_every=args.publish_every,
                       log_path=args.metrics_log or ck.parent / "prequential.jsonl",
                       checkpoint_every=args.checkpoint_every,
                       journal_path=None if args.journal == "" else (args.journal or ck.parent / "journal.jsonl"),
                       join=args.join)
    if args.metrics_port is not None:
        from trainer.telemetry import TrainerMetrics, serve

        serve(TrainerMetrics(tr).registry, args.metrics_port, args.metrics_host)
        console.print(f"Prometheus /metrics on http://{args.metrics_host}:{args.metrics_port}/metrics")
    console.print(f"rankers on {tr.learner.device}")
    for n, (dense, sparse) in tr.learner.param_counts().items():
        console.print(f"{n}: dense {dense:,} / sparse {sparse:,} parameters")
    if args.epochs and args.follow:
        raise SystemExit("trm train: --epochs warm-starts on a window of history; run it first, then "
                         "`trm train --follow` with the same --checkpoint-dir continues from it")
    if args.epochs:
        return _warm_start(args, tr, console)
    if args.follow:
        kafka = KafkaConfig.from_env(bootstrap_servers=args.bootstrap)
        done = follow_sync(tr, kafka, group_id=args.group_id, batch_size=args.batch_size, max_events=args.max_events,
                           idle_timeout_s=args.idle_timeout if args.idle_timeout > 0 else None,
                           feature_group=args.feature_group or None)
    else:
        from trainer.evaluate import window_events

        events = window_events(args.data, args.start, args.end)
        done = run_events(tr, list(events.itertuples(index=False)), args.batch_size, max_events=args.max_events)
    t = tr.timings
    rate = done / t.total_s if t.total_s else 0.0
    console.print(f"trained on {done:,} events in {t.total_s:.1f} s ({rate:,.0f} events/s), step {tr.state.step}; "
                  f"join {t.join_s / max(t.total_s, 1e-9):.0%} of wall time; unknown items {tr.fstats.unknown_item:,}; "
                  f"checkpoint {read_latest(ck)}")
    return 0


def _warm_start(args, tr, console) -> int:
    """Epochs over the window's point-in-time rows, early-stopped on its last --valid-share."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from trainer.evaluate import window_events
    from trainer.warm_start import WarmStartConfig, WarmStartError, warm_start

    if tr.resume():
        raise SystemExit(f"trm train --epochs: {args.checkpoint_dir} already holds a checkpoint; a warm start "
                         "begins from fresh weights: pass a new --checkpoint-dir")
    events = window_events(args.data, args.start, args.end)
    cfg = WarmStartConfig(max_epochs=args.epochs, patience=args.patience, valid_share=args.valid_share)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                  TimeElapsedColumn(), console=console) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = "point-in-time join (Feast)" if phase == "join" else "epochs (training rows)"
                tasks[phase] = bar.add_task(label, total=total)
            bar.update(tasks[phase], completed=done)

        try:
            res = warm_start(tr, events, cfg, progress)
        except WarmStartError as exc:
            raise SystemExit(f"trm train --epochs: {exc}") from None
    for n in tr.learner.names:
        aucs = ", ".join(f"{a:.4f}" for a in res.valid_auc[n])
        console.print(f"{n}: validation AUC by epoch [{aucs}] -> kept epoch {res.best_epoch[n]}; "
                      f"{res.examples_per_s.get(n, 0):,.0f} training rows/s alone")
    console.print(f"warm start on {res.n_train:,} events, validated on {res.n_valid:,}, {res.epochs} epoch(s) in "
                  f"{res.total_s:.1f} s (join {res.join_s:.1f} s); trained until {res.trained_until}; "
                  f"checkpoint {read_latest(Path(args.checkpoint_dir))}. `trm train --follow` continues from it "
                  "and skips the events before that second.")
    return 0


def read_latest(ck: Path) -> str:
    from trainer.checkpoint import read_pointer

    p = read_pointer(ck)
    return str(p) if p else "none"


def _eval(args) -> int:
    from trainer.evaluate import evaluate, print_results, window_events
    from trm.config import feast_repo_path

    events = window_events(args.data, args.start, args.end)
    if events.empty:
        raise SystemExit("trm eval: no events in the window")
    results = evaluate(feast_repo_path(args.repo), args.checkpoint, events, args.fit_cutoff, args.out)
    print_results(results, f"{len(events):,} events, window [{args.start}, {args.end})")
    if args.out:
        print(f"wrote {args.out}/metrics.json and {args.out}/auc_by_age.png")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from streams.contract.topics import DEFAULT_WORKER_GROUPS, TRAINER_GROUP
    from trm import DEFAULT_DATA_DIR

    t = subparsers.add_parser("train", help="train TRM and baselines continuously on point-in-time Feast features")
    t.add_argument("--follow", action="store_true", help="consume the interactions topic (own consumer group)")
    t.add_argument("--models", default="trm", help="comma list of trm,id,gen_only,two_gram,prefix_ngram or 'all'")
    t.add_argument("--repo", default=None, help="Feast repo (default: TRM_FEAST_REPO or feature_repo/)")
    t.add_argument("--artifact", default=None, help="tokenizer artifact (default: TRM_TOKENIZER_ARTIFACT)")
    t.add_argument("--levels", type=int, default=None, help="without --artifact: gen-token levels L")
    t.add_argument("--codebook", type=int, default=None, help="without --artifact: codebook size K")
    t.add_argument("--tokenizer-version", default=None, help="without --artifact: accepted tokenizer_version")
    t.add_argument("--fit-cutoff", type=int, default=None, help="epoch s the tokenizer was fitted up to (for eval)")
    t.add_argument("--checkpoint-dir", default=str(DEFAULT_RUN / "ckpt"))
    t.add_argument("--models-dir", default=None, help="published versions (default: <checkpoint-dir>/../models)")
    t.add_argument("--publish-every", type=int, default=50, help="steps between published model versions (0: never)")
    t.add_argument("--checkpoint-every", type=int, default=1, help="micro-batches between checkpoints/commits")
    t.add_argument("--metrics-log", default=None, help="prequential JSONL (default: <checkpoint-dir>/../prequential.jsonl)")
    t.add_argument("--journal", default=None,
                   help="progress JSONL, a line per trained batch (its offsets) and per checkpoint "
                        "(default: <checkpoint-dir>/../journal.jsonl; '': none)")
    t.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (prequential AUC per model, checkpoint age, "
                        "consumer lag, batch latency; trainer/telemetry.py). Default: off")
    t.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (0.0.0.0 in a container)")
    t.add_argument("--batch-size", type=int, default=2048, help="events per micro-batch (one PIT join)")
    t.add_argument("--minibatch", type=int, default=256, help="rows per optimizer step")
    t.add_argument("--epochs-per-batch", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--wide-lr", type=float, default=1e-2,
                   help="learning rate of the linear logit on the request-time features")
    t.add_argument("--threads", type=int, default=1, help="torch threads")
    t.add_argument("--device", default=None,
                   help="where the rankers train: auto (CUDA when torch sees a GPU) | cpu | cuda | cuda:N "
                        "(default: TRM_TRAINER_DEVICE, else auto). The per-user table stays on the CPU")
    t.add_argument("--join", choices=("index", "feast"), default="index",
                   help="point-in-time join per batch: 'index' reads each offline part file once and answers "
                        "recent batches in O(batch) (trainer/pit_index.py); 'feast' runs get_historical_features "
                        "per batch (cost grows with the store). Same answers either way")
    t.add_argument("--d-model", type=int, default=None)
    t.add_argument("--blocks", type=int, default=None)
    t.add_argument("--backbone", choices=("rankmixer", "transformer"), default=None)
    t.add_argument("--epochs", type=int, default=0,
                   help="warm start: up to this many epochs over the --start/--end window's point-in-time rows, "
                        "early-stopped on its last --valid-share, then checkpoint (0: replay the window once, "
                        "prequentially)")
    t.add_argument("--patience", type=int, default=1, help="--epochs: stop after this many epochs without a better "
                                                            "validation AUC")
    t.add_argument("--valid-share", type=float, default=0.2,
                   help="--epochs: last share of the window (by event time) that early stopping validates on")
    t.add_argument("--max-events", type=int, default=None)
    t.add_argument("--bootstrap", default=None, help="--follow: Kafka bootstrap (default TRM_KAFKA_BOOTSTRAP)")
    t.add_argument("--group-id", default=TRAINER_GROUP, help="--follow: the trainer's consumer group")
    t.add_argument("--feature-group", default=DEFAULT_WORKER_GROUPS.interactions,
                   help="--follow: wait until this (streams worker) group committed past a batch ('' : don't)")
    t.add_argument("--idle-timeout", type=float, default=0, help="--follow: stop after this many idle seconds (0: never)")
    t.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="without --follow: MovieLens dir to replay")
    t.add_argument("--start", type=float, default=None, help="without --follow: window start (epoch s or quantile)")
    t.add_argument("--end", type=float, default=None, help="without --follow: window end (epoch s or quantile)")
    t.set_defaults(func=_train)

    e = subparsers.add_parser("eval", help="AUC / GAUC / log-loss and AUC by item age on PIT features of a window")
    e.add_argument("--checkpoint", default=str(DEFAULT_RUN / "ckpt"), help="checkpoint dir, or a dir with LATEST")
    e.add_argument("--repo", default=None, help="Feast repo (default: TRM_FEAST_REPO or feature_repo/)")
    e.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="MovieLens dir holding the labelled events")
    e.add_argument("--start", type=float, default=None, help="window start: epoch s, or a time quantile in [0, 1]")
    e.add_argument("--end", type=float, default=None, help="window end: epoch s, or a time quantile in [0, 1]")
    e.add_argument("--fit-cutoff", type=int, default=None, help="tokenizer fit cutoff (default: from the checkpoint)")
    e.add_argument("--out", default=None, help="directory for metrics.json, scores.parquet, auc_by_age.png")
    e.set_defaults(func=_eval)
