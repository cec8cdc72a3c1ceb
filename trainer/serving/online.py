"""One ranking request's features from the Feast online store, as the frame the trainer scores.

The read is `store.get_online_features(features=<FeatureService ranker_features>, entity_rows=
[{"user_id": u, "item_id": i}, ...])`: the same service the trainer's point-in-time join reads
(trainer.pit_join.FEATURE_SERVICE), so the online row of a candidate has exactly the columns of an
offline joined row. `joined_frame` adds what the join carries besides the features (user_id,
item_id, label = 0, event_time = the request's second), which is all trainer.evaluate.score needs.
A candidate the store has no tokens for comes back with nulls; the featurizer scores it with the
unknown token (known = False), as it does offline.

Failure behaviour: any exception of the store (opening the repo, the registry, the read itself) is
raised as `StoreUnavailable` with the reason (the app answers 503). The failed FeatureStore is
dropped, and the next read opens a fresh one, so the service recovers by itself when the store is
back (a new connection: a restored SQLite file or a restarted Redis is picked up without a restart).

With `--token-cache kafka` (CachedOnlineFeatures) the candidates' item_tokens features come from
an in-process cache of the `item_tokens` topic (trainer/serving/token_cache.py) and only the rest
is read from Feast: the user's views once, for one entity row (not once per candidate), the other
item views (item_stats) per candidate, and item_tokens only for the candidates the cache misses.
The frame is the same as the service read's, value for value, so the scores are equal.

Why a lock around the read: the embedded SQLite online store shares one connection across threads
(check_same_thread=False); reads of one FeatureStore are serialised so a cursor is never shared.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import TrainerError
from ..featurizer import READS
from ..pit_join import FEATURE_SERVICE


class StoreUnavailable(TrainerError, RuntimeError):
    """The online store could not be opened or read; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class OnlineRead:
    frame: pd.DataFrame  # one row per candidate, in request order: user_id, item_id, label, event_time + READS
    seconds: float  # wall time of the store read(s)
    cache_hits: int = 0  # candidates whose item_tokens came from the token cache (CachedOnlineFeatures)
    cache_misses: int = 0  # candidates read from Feast's item_tokens instead


def joined_frame(features: pd.DataFrame, user_id: int, item_ids: Sequence[int], event_time: int) -> pd.DataFrame:
    """Online features (one row per candidate, request order) -> the joined frame trainer.evaluate.score reads."""
    n = len(item_ids)
    if len(features) != n:
        raise StoreUnavailable(f"online read returned {len(features)} rows for {n} candidates")
    frame = pd.DataFrame({
        "user_id": np.full(n, user_id, dtype=np.int64),
        "item_id": np.asarray(item_ids, dtype=np.int64),
        "label": np.zeros(n, dtype=np.int64),  # unknown at serving; no model reads it to score
        "event_time": np.full(n, event_time, dtype=np.int64),
    })
    features = features.reset_index(drop=True)
    for c in READS:  # a column the service lacks reads as null, as the featurizer treats it
        frame[c] = features[c] if c in features.columns else None
    return frame


class OnlineFeatures:
    """The FeatureStore of `repo` and its FeatureService `service`, opened lazily and re-opened after a failure."""

    def __init__(self, repo: str, service: str = FEATURE_SERVICE):
        self.repo, self.service_name = str(repo), service
        self._lock = threading.Lock()
        self._store: Any = None  # feast.FeatureStore (imported lazily)
        self._service: Any = None  # feast.FeatureService
        self.error: str | None = "online store not opened yet"  # None while the last read succeeded

    @property
    def healthy(self) -> bool:
        return self.error is None

    def _open_locked(self) -> None:
        from feast import FeatureStore  # heavy: imported when the store is first opened

        try:
            store = FeatureStore(repo_path=self.repo)
            service = store.get_feature_service(self.service_name)
        except Exception as exc:  # noqa: BLE001 - a missing repo, registry or service: the store is down
            self.error = f"cannot open the Feast repo {self.repo}: {type(exc).__name__}: {exc}"
            raise StoreUnavailable(self.error) from exc
        # `error` stays as it is: only a read that succeeds clears it. Opening a FeatureStore touches
        # the registry, not the online store (a Redis that is down opens fine), so the poller's
        # re-open must not make /healthz answer 200 while every read fails.
        self._store, self._service = store, service

    def open(self) -> None:
        """Open the store now if it is not open (the poller calls this, so the first request finds it open)."""
        with self._lock:
            if self._store is None:
                self._open_locked()

    def read(self, user_id: int, item_ids: Sequence[int], event_time: int) -> OnlineRead:
        """The joined frame of (user_id, item) for every candidate; StoreUnavailable if the store fails."""
        rows = [{"user_id": int(user_id), "item_id": int(i)} for i in item_ids]
        with self._lock:
            if self._store is None:
                self._open_locked()
            t0 = time.perf_counter()
            try:
                features = self._store.get_online_features(features=self._service, entity_rows=rows).to_df()
            except Exception as exc:  # noqa: BLE001 - whatever the store raised, the request gets a 503
                self._store = self._service = None  # the next read opens a fresh store (new connection)
                self.error = f"online feature read failed: {type(exc).__name__}: {exc}"
                raise StoreUnavailable(self.error) from exc
            seconds = time.perf_counter() - t0
            self.error = None
        return OnlineRead(joined_frame(features, user_id, item_ids, event_time), seconds)

    def probe(self) -> bool:
        """One read of a single (user 0, item 0) row: True when the store answers (health checks)."""
        try:
            self.read(0, [0], 0)
        except StoreUnavailable:
            return False
        return True


TOKEN_VIEW = "item_tokens"  # the feature view the token cache stands in for (the `item_tokens` topic's records)


class CachedOnlineFeatures(OnlineFeatures):
    """OnlineFeatures whose item_tokens features come from `cache` (a KafkaTokenCache), misses from Feast.

    The FeatureService's views are split by entity when the store is opened: user-keyed views are
    read for the one user, item-keyed views other than item_tokens for every candidate, item_tokens
    for the cache misses only. Three online reads at most; each is to_dict (no DataFrame per view)."""

    def __init__(self, repo: str, cache, service: str = FEATURE_SERVICE):
        super().__init__(repo, service)
        self.cache = cache
        self._refs: dict[str, list[str]] = {}  # "user" | "item" | "tokens" -> feature refs
        self._token_features: list[str] = []

    def _open_locked(self) -> None:
        super()._open_locked()
        try:
            refs: dict[str, list[str]] = {"user": [], "item": [], "tokens": []}
            for proj in self._service.feature_view_projections:
                names = [f.name for f in proj.features]
                if proj.name == TOKEN_VIEW:
                    group = "tokens"
                    self._token_features = names
                else:
                    keys = set(self._store.get_feature_view(proj.name).join_keys)
                    if keys == {"user_id"}:
                        group = "user"
                    elif keys == {"item_id"}:
                        group = "item"
                    else:
                        raise ValueError(f"feature view {proj.name} has join keys {sorted(keys)}: "
                                         f"neither the user's nor the item's")
                refs[group] += [f"{proj.name}:{n}" for n in names]
            if not refs["tokens"]:
                raise ValueError(f"the FeatureService {self.service_name} reads no {TOKEN_VIEW} features")
        except Exception as exc:  # noqa: BLE001 - a repo the cache cannot stand in for is not usable
            self._store = self._service = None
            self.error = f"cannot split the FeatureService {self.service_name}: {type(exc).__name__}: {exc}"
            raise StoreUnavailable(self.error) from exc
        self._refs = refs

    def read(self, user_id: int, item_ids: Sequence[int], event_time: int) -> OnlineRead:
        n = len(item_ids)
        cached = [self.cache.get(int(i)) for i in item_ids]
        misses = [int(i) for i, r in zip(item_ids, cached) if r is None]
        with self._lock:
            if self._store is None:
                self._open_locked()
            t0 = time.perf_counter()
            try:
                get = self._store.get_online_features
                refs = self._refs
                user = get(features=refs["user"], entity_rows=[{"user_id": int(user_id)}]).to_dict() \
                    if refs["user"] else {}
                items = get(features=refs["item"], entity_rows=[{"item_id": int(i)} for i in item_ids]).to_dict() \
                    if refs["item"] else {}
                fallback = get(features=refs["tokens"], entity_rows=[{"item_id": i} for i in misses]).to_dict() \
                    if misses else {}
            except Exception as exc:  # noqa: BLE001 - whatever the store raised, the request gets a 503
                self._store = self._service = None
                self.error = f"online feature read failed: {type(exc).__name__}: {exc}"
                raise StoreUnavailable(self.error) from exc
            seconds = time.perf_counter() - t0
            self.error = None
        cols: dict[str, list] = {}
        for c, v in user.items():
            if c != "user_id":
                cols[c] = [v[0]] * n  # one user: the same row for every candidate
        for c, v in items.items():
            if c != "item_id":
                cols[c] = v
        k = 0
        token_cols: dict[str, list] = {c: [None] * n for c in self._token_features}
        for j, r in enumerate(cached):
            if r is None:  # the store's row (or nulls: no tokens anywhere)
                for c in self._token_features:
                    token_cols[c][j] = fallback[c][k]
                k += 1
            else:
                for c in self._token_features:
                    token_cols[c][j] = r.get(c)
        cols.update(token_cols)
        frame = joined_frame(pd.DataFrame(cols, index=range(n)), user_id, item_ids, event_time)
        return OnlineRead(frame, seconds, n - len(misses), len(misses))
