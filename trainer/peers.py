"""Peer learners: what a user would pick instead of our rankers, run on the same events.

`VWPeer` is Vowpal Wabbit with logistic loss, learning per event: every row of a joined frame
is predicted, then learned, before the next row is read. It reads the same point-in-time (PIT)
joined rows as the trainer's models (never the row's own label before predicting it), plus the
catalogue's genres and title words (shared/quality/PEERS.md measured 0.810 AUC for it on
ml-latest-small). Namespaces, one letter each:

  u  user id                      i  item id
  g  the item's genres            t  the item's title words (lower-cased, punctuation stripped)
  c  log1p of the PIT counters (user events / positives, item interactions / positives), and,
     when the frame has them, log1p of the item's age in days and of the hours since the
     user's previous event
  r  logit of smoothed positive rates: user (pos+1)/(n+2), item (pos+1)/(n+2), and, when the
     frame has `recent_labels` (the user's last labels, oldest first), the same of all of them
     and of the last 5, plus the last label itself as +1/-1

with the interactions user x genre, user x title word and user x rates (`-q ug -q ut -q ur`).
With `era=True` (off in the reports: the issue fixes the peer's inputs) it also reads

  e  the item's decade and its release-age bucket at the event, from the year its title states:
     TRM's era keys (trainer/features.era_keys); cross them with `-q ue`

A feature the row has no value for (NaN / None: the entity has no feature row yet) counts as 0
events; a column the frame lacks is left out. Only PIT columns are read: the row's own `label`
is used solely as the target VW learns after it has predicted the row.

On ml-latest-small, frames of 2,048 events in time order, PIT counters from strictly earlier
events: AUC 0.825 after the median event time and 0.788 on the validation window [q0.25, median)
the arguments were chosen on (with only the four counters: 0.816 / 0.776, and 0.810 / 0.771 with
PEERS.md's arguments); 50-80k events/s on one core. Scores do not depend on the frame size.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import TrainerError
from .features import COUNT_COLUMNS

# PEERS.md's configuration (-q ug -q ut -b 24) plus what the validation window [q0.25, median) of
# ml-latest-small chose: -q ur (each user weighs the item's and their own recent rates) and
# --power_t 0.3 (the learning rate decays slower than VW's 0.5: the stream drifts). -b 24 keeps
# hash collisions negligible on larger catalogues (22 scored the same here; 18 lost 0.003 AUC).
DEFAULT_ARGS = "--loss_function logistic --link logistic -q ug -q ut -q ur --power_t 0.3 -b 24"

_BAD = re.compile(r"[\s:|]+")  # characters VW's text format reserves inside a feature name
_WORD = re.compile(r"[^\w]+")  # title words: split on anything that is not a letter/digit/_
DAY, HOUR = 86400.0, 3600.0


class PeerError(TrainerError, ValueError):
    """A peer was given a frame it cannot read (missing id or label columns)."""


def feature_name(text: str) -> str:
    """`text` as one VW feature name: no whitespace, ':' or '|' inside it."""
    return _BAD.sub("_", str(text).strip())


def title_words(title: str) -> list[str]:
    """Lower-cased title words, punctuation stripped ("Toy Story (1995)" -> toy, story, 1995)."""
    return [w for w in _WORD.split(str(title).lower()) if w]


def _numeric(joined: pd.DataFrame, col: str) -> np.ndarray:
    """A column as float64, NaN/None/missing column -> 0."""
    if col not in joined.columns:
        return np.zeros(len(joined))
    return np.nan_to_num(pd.to_numeric(joined[col], errors="coerce").to_numpy(float), nan=0.0)


def _logit_rate(pos: np.ndarray, n: np.ndarray) -> np.ndarray:
    pos = np.clip(pos, 0.0, None)
    n = np.maximum(n, pos)
    p = (pos + 1.0) / (n + 2.0)
    return np.log(p / (1.0 - p))


def _labels(value) -> list[int]:
    """A list-valued feature (list, array, None, NaN) -> its 0/1 entries; anything else is skipped."""
    if value is None or isinstance(value, (float, int, str, bytes)):
        return []
    return [1 if x == 1 else 0 for x in value if x == 0 or x == 1]


def _fmt(name: str, values: np.ndarray) -> list[str]:
    # 4 decimals: below anything the learner can resolve, and short strings parse fast
    return [f"{name}:{v:.4f}" for v in values.tolist()]


class VWPeer:
    """Vowpal Wabbit, logistic, per event: what a user would pick instead of our rankers."""

    name = "vw"

    def __init__(self, item_meta: Mapping[int, tuple[Sequence[str], str]] | None = None,
                 args: str = DEFAULT_ARGS, seed: int = 0, *, era: bool = False, _model: str | Path | None = None):
        from vowpalwabbit import Workspace  # heavy C extension: imported when a peer is built

        self.args, self.seed, self.era = args, int(seed), era
        self.item_meta = dict(item_meta or {})
        argv = args.split() + ["--quiet", "--random_seed", str(self.seed)]
        if _model is not None:
            argv += ["-i", str(_model)]
        self.ws = Workspace(arg_list=argv)
        self._item_ns: dict[int, str] = {}
        self.n_learned = 0

    # -- examples ---------------------------------------------------------------------------
    def _item(self, iid: int) -> str:
        s = self._item_ns.get(iid)
        if s is None:
            genres, title = self.item_meta.get(iid, ((), ""))
            s = f"|i i{iid}"
            g = " ".join(feature_name(x) for x in genres if feature_name(x))
            if g:
                s += " |g " + g
            t = " ".join(title_words(title))
            if t:
                s += " |t " + t
            self._item_ns[iid] = s
        return s

    def examples(self, joined: pd.DataFrame) -> list[str]:
        """The rows of `joined` as unlabelled VW text examples, in order."""
        for col in ("user_id", "item_id"):
            if col not in joined.columns:
                raise PeerError(f"a peer needs column {col!r}; the frame has {list(joined.columns)}")
        un, up, inn, ip = (_numeric(joined, c) for c in COUNT_COLUMNS)
        cols = [_fmt("un", np.log1p(np.clip(un, 0, None))), _fmt("up", np.log1p(np.clip(up, 0, None))),
                _fmt("in", np.log1p(np.clip(inn, 0, None))), _fmt("ip", np.log1p(np.clip(ip, 0, None)))]
        et = _numeric(joined, "event_time")
        if "created_at" in joined.columns:
            created = pd.to_numeric(joined["created_at"], errors="coerce").to_numpy(float)
            age = np.where(np.isnan(created), 0.0, np.clip(et - created, 0, None) / DAY)
            cols.append(_fmt("age", np.log1p(age)))
        if "last_event_time" in joined.columns:
            last = pd.to_numeric(joined["last_event_time"], errors="coerce").to_numpy(float)
            gap = np.where(np.isnan(last), 0.0, np.clip(et - last, 0, None) / HOUR)
            cols.append(_fmt("gap", np.log1p(gap)))
        rates = [_fmt("ur", _logit_rate(up, un)), _fmt("ir", _logit_rate(ip, inn))]
        if "recent_labels" in joined.columns:
            rates += self._recent(joined)
        users = pd.to_numeric(joined["user_id"], errors="coerce").fillna(-1).astype("int64").tolist()
        items = pd.to_numeric(joined["item_id"], errors="coerce").fillna(-1).astype("int64").tolist()
        c_ns = [" ".join(t) for t in zip(*cols)]
        r_ns = [" ".join(t) for t in zip(*rates)]
        item = self._item
        out = [f" |u u{u} {item(i)} |c {c} |r {r}" for u, i, c, r in zip(users, items, c_ns, r_ns)]
        if self.era:
            from tokenizer.lexical import release_year, year_token

            from .features import era_keys

            years = [release_year(self.item_meta.get(i, ((), ""))[1]) for i in items]
            era = era_keys(np.array([[year_token(y) if y else -1] for y in years], dtype=np.int64).reshape(-1, 1), et)
            out = [ex + (f" |e d{d} a{a}" if d >= 0 else "") for ex, (d, a) in zip(out, era.tolist())]
        return out

    @staticmethod
    def _recent(joined: pd.DataFrame) -> list[list[str]]:
        """Smoothed rates of the user's recent labels (oldest first): all of them, the last 5, and
        the last label itself (+1 / -1; 0 with no history)."""
        n = len(joined)
        s_all, k_all, s5, k5, last = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
        for j, value in enumerate(joined["recent_labels"].tolist()):
            labels = _labels(value)
            if labels:
                s_all[j], k_all[j] = sum(labels), len(labels)
                tail = labels[-5:]
                s5[j], k5[j] = sum(tail), len(tail)
                last[j] = 2.0 * labels[-1] - 1.0
        return [_fmt("rl", _logit_rate(s_all, k_all)), _fmt("r5", _logit_rate(s5, k5)), _fmt("l1", last)]

    # -- learning ---------------------------------------------------------------------------
    def score_then_learn(self, joined: pd.DataFrame) -> np.ndarray:
        """P(label=1) of every row in order, each predicted before VW learns from it; then learns it.

        A row whose label is missing is only predicted.
        """
        if "label" not in joined.columns:
            raise PeerError("score_then_learn needs a 'label' column")
        exs = self.examples(joined)
        labels = pd.to_numeric(joined["label"], errors="coerce").to_numpy(float).tolist()
        out = np.empty(len(exs))
        ws = self.ws
        for j, (ex, y) in enumerate(zip(exs, labels)):
            if y != y:  # NaN: nothing to learn
                out[j] = ws.predict(ex)
                continue
            e = ws.parse(("1" if y > 0 else "-1") + ex)
            ws.learn(e)  # GD predicts with the weights before its update: that is the score
            out[j] = e.get_simplelabel_prediction()
            ws.finish_example(e)
            self.n_learned += 1
        return out

    def score(self, joined: pd.DataFrame) -> np.ndarray:
        """Predict only (no learning)."""
        ws = self.ws
        return np.fromiter((ws.predict(ex) for ex in self.examples(joined)), float, count=len(joined))

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """VW's own model file at `path` (weights with their adaptive/normalized state, so a loaded
        peer continues exactly), and beside it `<path>.json`: the args and seed it was built with."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.ws.save(str(path))
        _sidecar(path).write_text(json.dumps({"args": self.args, "seed": self.seed, "era": self.era,
                                                   "n_learned": self.n_learned}))
        return path

    @classmethod
    def load(cls, path: str | Path, item_meta: Mapping[int, tuple[Sequence[str], str]] | None = None,
             args: str | None = None, seed: int | None = None) -> "VWPeer":
        """A peer continued from `save`'s file. `args`/`seed` default to those saved beside it (else
        DEFAULT_ARGS / 0): VW's file keeps -b, -q and the link but not the loss, so they are given
        again (VW merges a restated -q with the file's rather than doubling it)."""
        path = Path(path)
        if not path.is_file():
            raise PeerError(f"no VW model file at {path}")
        saved = json.loads(_sidecar(path).read_text()) if _sidecar(path).is_file() else {}
        peer = cls(item_meta, args=args if args is not None else saved.get("args", DEFAULT_ARGS),
                   seed=seed if seed is not None else int(saved.get("seed", 0)), era=bool(saved.get("era", False)),
                   _model=path)
        peer.n_learned = int(saved.get("n_learned", 0))
        return peer

    def close(self) -> None:
        """Free VW's weights (the peer is unusable afterwards)."""
        self.ws.finish()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def item_meta_of(items: Mapping[int, object]) -> dict[int, tuple[tuple[str, ...], str]]:
    """Catalogue items (objects with .genres and .title, e.g. streams.movielens Item) -> item_meta."""
    return {int(k): (tuple(v.genres), str(v.title)) for k, v in items.items()}

