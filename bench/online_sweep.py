"""Sweep designs of the per-user online table on a recorded validation run (bench/validation_dump.py).

The ranker's logits do not depend on the table, so every design here is scored on exactly the rows
and logits the real trainer produced: AUC / GAUC on the prequential validation window, the table
learning the warm-start rows first, as the trainer does. Designs are named `k=v` overrides of
UserWeights' arguments (run through the shipped class itself) or with extra inputs it lacks
(`experimental`):

    python bench/online_sweep.py out/val.npz "base" "stack_lr=0.1" "key_lr=0.1" "glob=all stack=1" ...

Shipped designs are averaged with the per-event linear model as the trainer does (`linear_mix=0`:
the table alone); the experimental ones are the table alone.

`codes=none|prefixes|random` asks what the semantic codes are worth to the online parts: the table's
and the linear model's keys lose the mem-tokens and next-nearest codes, and keep the gen prefixes
(`prefixes`), none of them (`none`), or get another item's prefixes in their place (`random`: a
seeded permutation of the items, so the same groups of the same sizes, with no content). Recordings
with the tokenizer's fit cutoff also report the AUC on items it never saw.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse(spec: str) -> dict:
    out = {}
    for kv in spec.split():
        if kv == "base":
            continue
        k, v = kv.split("=")
        try:
            out[k] = float(v) if "." in v or "e" in v else int(v)
        except ValueError:
            out[k] = v
    return out


SHIPPED = {"bits", "lr", "key_lr", "key_global_lr", "power", "stack_lr", "features",  # UserWeights' own arguments
           "codes"}  # and which semantic keys it reads (with_codes)
CODES = ("none", "prefixes", "random")


def with_codes(d: dict, keys: np.ndarray, how: str | None, seed: int = 0) -> np.ndarray:
    """(N, M) online keys with the semantic ones replaced as `codes=how` says (module docstring).

    Semantic keys, by namespace (trainer/models/user_weights.py): the gen prefixes and next-nearest
    codes (below MEM_NS), the mem-tokens and the n-gram baselines' code n-grams. The item id (ID_NS),
    lexical and era keys stay. `random` gives each item the prefix keys of another item (a seeded
    permutation of the items): the same groups, of the same sizes, with no content."""
    if how is None or keys.shape[1] == 0:
        return keys
    if how not in CODES:
        raise SystemExit(f"codes={how}: expected one of {', '.join(CODES)}")
    from trainer.models.user_weights import MEM_NS, PREFIX_NGRAM_NS, TWO_GRAM_NS

    L = d["gen"].shape[1]
    ns = np.where(keys >= 0, keys & 15, -1)
    out = np.where((ns >= 0) & ((ns < MEM_NS) | np.isin(ns, (MEM_NS, TWO_GRAM_NS, PREFIX_NGRAM_NS))), -1, keys)
    lead = keys.shape[1] >= L and all(((ns[:, j] == j) | (ns[:, j] < 0)).all() and (ns[:, j] == j).any()
                                      for j in range(L))
    if not lead:
        return out  # no gen prefixes lead these keys (TRM's linear model reads its lexical and era keys)
    if how == "prefixes":
        out[:, :L] = keys[:, :L]
    elif how == "random":
        _, first, inv = np.unique(d["item"], return_index=True, return_inverse=True)
        own = keys[first, :L]  # (I, L) each item's prefix keys, as first seen
        out[:, :L] = own[np.random.default_rng(seed).permutation(len(own))][inv]
    return out


def model_keys(d: dict, model: str) -> np.ndarray:
    """(N, M) the online keys `model`'s table read. Recordings before per-model keys kept only the
    first model's, as `keys`: another model's replay would read them, so it is refused."""
    if f"keys_{model}" in d:
        return d[f"keys_{model}"]
    first = next(k[2:] for k in d if k.startswith("z_"))
    if model != first:
        raise SystemExit(f"this recording holds only {first}'s online keys; record {model} again with "
                         "bench/validation_dump.py to replay its table")
    return d["keys"]


def shipped(d: dict, spec: dict, model: str = "trm") -> np.ndarray:
    """(N,) logits of the shipped UserWeights with `spec`'s arguments over every recorded row, in order."""
    from trainer.models.user_weights import UserWeights, ns_rates

    kw = {k: v for k, v in spec.items() if k in SHIPPED and k != "codes"}
    if "features" in kw:
        kw["features"] = tuple(kw["features"].split(","))
    from trainer.models.config import RankerConfig

    c = RankerConfig()  # the shipped defaults, then the spec's overrides
    uw = UserWeights(**{"bits": c.user_bits, "lr": c.user_lr, "key_lr": c.key_lr, "key_global_lr": c.key_global_lr,
                        "power": c.user_power, "stack_lr": c.stack_lr,
                        "ns_rates": ns_rates(c), **kw})
    keys = torch.from_numpy(with_codes(d, model_keys(d, model), spec.get("codes")))
    return uw.score_then_learn(torch.from_numpy(d[f"z_{model}"]), torch.from_numpy(d["user"]),
                               torch.from_numpy(d["stats"]), torch.from_numpy(d["label"]),
                               torch.from_numpy(d["t"]), keys if keys.shape[1] else None).numpy()


def with_linear(d: dict, z: np.ndarray, model: str = "trm", linear_mix: float | None = None,
                codes: str | None = None) -> np.ndarray:
    """(N,) `z` averaged with the shipped per-event linear model (models/online_linear.py) learned over the
    same rows, as the trainer does: the model family's own linear model, keys and mix."""
    from trainer.batch import Batch
    from trainer.models import RankerConfig, build_model

    m = build_model(model, RankerConfig(**({} if linear_mix is None else {"linear_mix": linear_mix})))
    if m.online_linear is None:
        return z
    t = {k: torch.from_numpy(d[k]) for k in ("label", "known", "stats", "lexical", "item", "user", "t")}
    era = torch.from_numpy(d["era"]) if "era" in d else None  # recordings before the era keys: none
    batch = Batch(label=t["label"], known=t["known"], stats=t["stats"], lexical=t["lexical"], era=era,
                  gen=torch.from_numpy(d["gen"]), item_id=t["item"], user_id=t["user"], event_time=t["t"])
    keys = m.linear_keys(batch.select(m.inputs))
    if keys is not None and codes is not None:
        keys = torch.from_numpy(with_codes(d, keys.numpy(), codes))
    lin = m.online_linear.score_then_learn(batch.user_id, batch.stats, keys, batch.label, batch.event_time)
    return m.mix(torch.from_numpy(z), lin).numpy()


def unseen(d: dict) -> np.ndarray | None:
    """(V,) the validation rows on items created at or after the tokenizer's fit cutoff; None when the
    recording does not hold it (recordings before it was kept)."""
    if "created" not in d or int(d.get("fit_cutoff", -1)) < 0:
        return None
    return d["created"][d["phase"] == 1] >= int(d["fit_cutoff"])


def run(d: dict, spec: dict, model: str = "trm") -> tuple[float, float, float]:
    """AUC / GAUC / AUC on unseen items (NaN: not recorded) on the validation rows: the shipped table
    when `spec` only sets its arguments, else the experimental designs below (which re-derive its
    slots so they can add inputs it lacks)."""
    from trainer.metrics import auc, gauc

    val = d["phase"] == 1
    y, u = d["label"][val], d["user"][val]
    mix = spec.pop("linear_mix", None)  # the linear model's share (default: the shipped one; 0: the table alone)
    if "codes" in spec and not set(spec) <= SHIPPED:
        raise SystemExit("codes= ablates the shipped table and linear model; it does not combine with the "
                         f"experimental designs' arguments ({', '.join(sorted(set(spec) - SHIPPED))})")
    if set(spec) <= SHIPPED:
        z = with_linear(d, shipped(d, spec, model), model, mix, spec.get("codes"))
        p = 1 / (1 + np.exp(-z[val]))
    else:
        p = torch.sigmoid(experimental(d, spec, model)).numpy()[val]
    return auc(y, p), gauc(y, p, u), _unseen_auc(d, y, p)


def _unseen_auc(d: dict, y: np.ndarray, p: np.ndarray) -> float:
    """AUC of the validation rows `y`, `p` on items the tokenizer never saw; NaN when not recorded."""
    from trainer.metrics import auc

    new = unseen(d)
    return auc(y[new], p[new]) if new is not None else float("nan")


def _line(d: dict, y: np.ndarray, p: np.ndarray, u: np.ndarray) -> str:
    """One result line's figures: AUC, GAUC and, where recorded, AUC on unseen items."""
    from trainer.metrics import auc, gauc

    return f"AUC {auc(y, p):.4f} GAUC {gauc(y, p, u):.4f}" + \
        (f" unseen {_unseen_auc(d, y, p):.4f}" if unseen(d) is not None else "")


def experimental(d: dict, spec: dict, model: str) -> torch.Tensor:
    from trainer.features import IDX
    from trainer.models.embedding import hash_ids
    from trainer.models.user_weights import _CROSS_SALT, _KEY_SALT, _MIX_J, _MIX_U

    bits = int(spec.get("bits", 18))
    size, mask = 1 << bits, (1 << bits) - 1
    feats = spec.get("features", "user_rate_logit,item_rate_logit,last5_rate_logit,prefix1_rate_logit").split(",")
    lr, key_lr, power = spec.get("lr", 0.1), spec.get("key_lr", 0.05), spec.get("power", 0.3)
    glob_lr = spec.get("glob_lr", 0.02)
    stats = torch.from_numpy(d["stats"]).double()
    users = torch.from_numpy(d["user"])
    keys = torch.from_numpy(model_keys(d, model))
    n_keys = int(spec.get("n_keys", keys.shape[1]))
    keys = keys[:, :n_keys]
    raw = torch.from_numpy(d[f"z_{model}"]).double()
    base = raw * spec.get("base_scale", 1.0)
    labels = torch.from_numpy(d["label"]).double()
    cols = torch.tensor([IDX[f] for f in feats])
    # 1) per-user slots: bias + features
    j = torch.arange(1 + len(cols))
    s_user = ((users.unsqueeze(1) * _MIX_U) ^ (j * _MIX_J)) & mask
    x_user = torch.cat([torch.ones(len(users), 1, dtype=torch.double), stats[:, cols]], 1)
    parts_s, parts_x, parts_r = [s_user], [x_user], [torch.full((x_user.shape[1],), lr)]
    if spec.get("nouser"):
        parts_s, parts_x, parts_r = [], [], []
    # 2) keys: global and user x key
    if n_keys and spec.get("keys", 1):
        glob = hash_ids(keys, size, _KEY_SALT)
        cross = hash_ids(hash_ids(keys, (1 << 31) - 1, _CROSS_SALT) ^ (users.unsqueeze(1) * _MIX_U), size)
        k = (keys >= 0).double()
        parts_s += [glob, cross]
        parts_x += [k, k]
        parts_r += [torch.full((2 * n_keys,), key_lr)]
    # 3) global weights on dense features (VW's c / r namespaces, learned per second)
    g = spec.get("glob")
    if g:
        gcols = list(range(stats.shape[1])) if g == "all" else [IDX[f] for f in g.split(",")]
        gs = (torch.arange(len(gcols)) * 7919 + 12345) & mask
        parts_s.append(gs.expand(len(users), -1))
        parts_x.append(stats[:, gcols])
        parts_r.append(torch.full((len(gcols),), glob_lr))
    # 4) the ranker's own logit as an input: a global and a per-user weight on it (stacking)
    if spec.get("stack"):
        parts_s.append(torch.full((len(users), 1), 99991) & mask)
        parts_x.append(raw.unsqueeze(1))
        parts_r.append(torch.tensor([spec.get("stack_lr", 0.01)]))
    if spec.get("ustack"):
        parts_s.append(((users * _MIX_U) ^ 0x5bd1e995).unsqueeze(1) & mask)
        parts_x.append(raw.unsqueeze(1))
        parts_r.append(torch.tensor([spec.get("ustack_lr", 0.02)]))
    S, X, R = torch.cat(parts_s, 1), torch.cat(parts_x, 1), torch.cat(parts_r)
    w = torch.zeros(size, dtype=torch.double)
    G = torch.full((size,), spec.get("g0", 1e-2), dtype=torch.double)
    sec = torch.from_numpy(d["t"])
    # groups: consecutive rows of one second, each scored before it is learned (as UserWeights)
    cut = torch.nonzero(sec[1:] != sec[:-1]).flatten() + 1
    bounds = [0, *cut.tolist(), len(base)]
    out = torch.empty_like(base)
    for a, b in zip(bounds[:-1], bounds[1:]):
        s, x = S[a:b], X[a:b]
        z = base[a:b] + (w[s] * x).sum(1)
        out[a:b] = z
        grad = (torch.sigmoid(z) - labels[a:b]).unsqueeze(1) * x
        G.index_add_(0, s.flatten(), (grad * grad).flatten())
        w.index_add_(0, s.flatten(), (-R * grad / G[s].pow(power)).flatten())
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="designs: 'base', UserWeights' arguments as k=v (bits, lr, key_lr, "
                                        "key_global_lr, power, stack_lr, features, linear_mix), codes=none|prefixes|random, "
                                        "or the experimental table's (glob=..., stack=1, ...); 'model=NAME' switches "
                                        "the model replayed by the designs after it")
    ap.add_argument("recording", help="an .npz written by bench/validation_dump.py")
    ap.add_argument("designs", nargs="*", help="designs to replay, each one quoted string of k=v")
    args = ap.parse_args(argv)
    if not Path(args.recording).is_file():
        raise SystemExit(f"{args.recording}: no such recording; write one with bench/validation_dump.py")
    d = dict(np.load(args.recording))
    val = d["phase"] == 1
    y, u = d["label"][val], d["user"][val]
    models = [k[2:] for k in d if k.startswith("z_")]
    for n in models + ["vw"]:
        print(f"recorded {n:10s} {_line(d, y, d[f'p_{n}'][val], u)}")
    for n in models:
        print(f"ranker alone {n:6s} {_line(d, y, 1 / (1 + np.exp(-d[f'z_{n}'][val])), u)}")
    model = models[0]
    for spec in args.designs:
        if spec.startswith("model="):
            model = spec.split("=")[1]
            continue
        a, g, un = run(d, parse(spec), model)
        print(f"{model:8s} {spec:60s} AUC {a:.4f} GAUC {g:.4f}" + (f" unseen {un:.4f}" if unseen(d) is not None else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
