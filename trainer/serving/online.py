"""One ranking request's features from the Feast online store, as the frame the trainer scores.

What is read: the FeatureService `ranker_features` (trainer.pit_join.FEATURE_SERVICE), the same
service the trainer's point-in-time join reads, so the online row of a candidate has exactly the
columns of an offline joined row. `joined_frame` adds what the join carries besides the features
(user_id, item_id, label = 0, event_time = the request's second), which is all
trainer.evaluate.score needs. A candidate the store has no tokens for comes back with nulls; the
featurizer scores it with the unknown token (known = False), as it does offline.

How it is read: the service's views are resolved once, when the store is opened (`ReadPlan`: each
view's FeatureView, its features and their types, its entity key), and a request calls the online
store's own `online_read(config, view, entity_keys, features)` per view: the user's views for the
one user (not once per candidate), the item views for the candidates. That is the call Feast's
`get_online_features` makes underneath; what it adds per request (resolving the service in the
registry, converting the entity rows, building and then unpacking a response protobuf) cost more
than the read itself. The values are converted with Feast's own `feast_value_type_to_python_type`
(what `OnlineResponse.to_dict` uses), so the frame is the one `get_online_features(...).to_df()`
gives, value for value and dtype for dtype (tests/test_serve.py checks it on SQLite and Redis).
It is still Feast's online store (SQLite embedded, Redis in production): its keys, its tables, its
connection. The poller re-resolves the plan from the registry every `PLAN_TTL_S`, off the request
path, so a `feast apply` is picked up as Feast's registry cache would pick it up (faster: Feast
caches the registry for 600 s by default).

Failure behaviour: any exception of the store (opening the repo, the registry, the read itself) is
raised as `StoreUnavailable` with the reason (the app answers 503). The failed FeatureStore is
dropped, and the next read opens a fresh one, so the service recovers by itself when the store is
back (a new connection: a restored SQLite file or a restarted Redis is picked up without a restart).

With `--token-cache kafka` (CachedOnlineFeatures) the candidates' item_tokens features come from
an in-process cache of the `item_tokens` topic (trainer/serving/token_cache.py) and only the rest
is read from Feast: the user's views, the other item views (item_stats) per candidate, and
item_tokens only for the candidates the cache misses. The frame is the same, value for value, so
the scores are equal.

Why a lock around the read: the embedded SQLite online store shares one connection across threads
(check_same_thread=False); reads of one FeatureStore are serialised so a cursor is never shared.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import TrainerError
from ..featurizer import READS
from ..pit_join import FEATURE_SERVICE

log = logging.getLogger(__name__)
USER_KEY, ITEM_KEY = "user_id", "item_id"  # the two entity keys a view of the service may have
TOKEN_VIEW = "item_tokens"  # the feature view the token cache stands in for (the `item_tokens` topic's records)
PLAN_TTL_S = 30.0  # how often the poller re-resolves the service's views from the registry


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


@dataclass(frozen=True)
class ViewRead:
    """One feature view of the service, as `online_read` takes it."""

    table: Any  # feast.FeatureView, as the registry holds it
    name: str  # the projection's name (the service's view name)
    features: tuple[str, ...]  # the service's features of it, in the service's order
    types: tuple[Any, ...]  # their feast ValueType (feast_value_type_to_python_type's hint, as to_dict passes it)
    key: str  # USER_KEY or ITEM_KEY
    key_field: str  # the ValueProto field of the key: "int64_val" or "int32_val"


@dataclass(frozen=True)
class ReadPlan:
    views: tuple[ViewRead, ...]
    resolved_at: float  # time.monotonic()

    def of(self, key: str) -> list[ViewRead]:
        return [v for v in self.views if v.key == key]


def resolve_plan(store, service) -> ReadPlan:
    """The service's views: each a user-keyed or item-keyed FeatureView with integer ids, else ValueError."""
    from feast.value_type import ValueType

    key_fields = {ValueType.INT64: "int64_val", ValueType.INT32: "int32_val"}
    views = []
    for proj in service.feature_view_projections:
        fv = store.get_feature_view(proj.name)
        keys = list(fv.join_keys)
        if keys not in ([USER_KEY], [ITEM_KEY]):
            raise ValueError(f"feature view {proj.name} has join keys {sorted(keys)}: neither the user's nor the item's")
        key_type = {c.name: c.dtype.to_value_type() for c in fv.entity_columns}.get(keys[0])
        if key_type not in key_fields:
            raise ValueError(f"feature view {proj.name}: entity key {keys[0]} is {key_type}, not an integer")
        dtypes = {f.name: f.dtype.to_value_type() for f in fv.features}
        names = tuple(f.name for f in proj.features)
        views.append(ViewRead(fv, proj.name, names, tuple(dtypes.get(n) for n in names), keys[0], key_fields[key_type]))
    return ReadPlan(tuple(views), time.monotonic())


def read_view(online_store, config, view: ViewRead, ids: Sequence[int]) -> dict[str, list]:
    """{feature: [python value or None per id]}: the online store's rows of `ids`, as Feast's to_dict gives them."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type as to_python

    keys = [EntityKey(join_keys=[view.key], entity_values=[Value(**{view.key_field: i})]) for i in ids]
    rows = online_store.online_read(config=config, table=view.table, entity_keys=keys,
                                    requested_features=list(view.features))
    if len(rows) != len(ids):
        raise RuntimeError(f"{view.name}: the online store returned {len(rows)} rows for {len(ids)} keys")
    cols: dict[str, list] = {f: [None] * len(ids) for f in view.features}
    pairs = list(zip(view.features, view.types))
    for j, (_, values) in enumerate(rows):
        if values:  # None: no row for this key (every feature null, as Feast's NOT_FOUND)
            for f, t in pairs:
                v = values.get(f)
                if v is not None:
                    cols[f][j] = to_python(v, t)
    return cols


def joined_frame(features: dict[str, list], user_id: int, item_ids: Sequence[int], event_time: int) -> pd.DataFrame:
    """Online features (one value per candidate, request order) -> the joined frame trainer.evaluate.score reads.

    One DataFrame built from one dict of columns (each column's dtype inferred from its values, as
    `pd.DataFrame(response.to_dict())` infers it); a column the service lacks reads as null."""
    n = len(item_ids)
    for c, v in features.items():
        if len(v) != n:
            raise StoreUnavailable(f"online read returned {len(v)} values of {c} for {n} candidates")
    cols: dict[str, Any] = {
        "user_id": np.full(n, user_id, dtype=np.int64),
        "item_id": np.asarray(item_ids, dtype=np.int64),
        "label": np.zeros(n, dtype=np.int64),  # unknown at serving; no model reads it to score
        "event_time": np.full(n, event_time, dtype=np.int64),
    }
    for c in READS:
        cols[c] = features[c] if c in features else [None] * n
    return pd.DataFrame(cols)


class OnlineFeatures:
    """The FeatureStore of `repo` and its FeatureService `service`, opened lazily and re-opened after a failure."""

    def __init__(self, repo: str, service: str = FEATURE_SERVICE):
        self.repo, self.service_name = str(repo), service
        self._lock = threading.Lock()
        self._store: Any = None  # feast.FeatureStore (imported lazily)
        self._service: Any = None  # feast.FeatureService
        self._online: Any = None  # the store's OnlineStore (its online_read)
        self._plan: ReadPlan | None = None
        self.error: str | None = "online store not opened yet"  # None while the last read succeeded

    @property
    def healthy(self) -> bool:
        return self.error is None

    def _check_plan(self, plan: ReadPlan) -> None:
        """A plan this reader cannot serve raises ValueError (CachedOnlineFeatures needs item_tokens)."""

    def _open_locked(self) -> None:
        from feast import FeatureStore  # heavy: imported when the store is first opened

        try:
            store = FeatureStore(repo_path=self.repo)
            service = store.get_feature_service(self.service_name)
        except Exception as exc:  # noqa: BLE001 - a missing repo, registry or service: the store is down
            self.error = f"cannot open the Feast repo {self.repo}: {type(exc).__name__}: {exc}"
            raise StoreUnavailable(self.error) from exc
        try:
            plan = resolve_plan(store, service)
            self._check_plan(plan)
            online = store._get_provider().online_store  # the provider's OnlineStore: what get_online_features reads
        except Exception as exc:  # noqa: BLE001 - a service this reader cannot read is not usable
            self.error = f"cannot read the FeatureService {self.service_name}: {type(exc).__name__}: {exc}"
            raise StoreUnavailable(self.error) from exc
        # `error` stays as it is: only a read that succeeds clears it. Opening a FeatureStore touches
        # the registry, not the online store (a Redis that is down opens fine), so the poller's
        # re-open must not make /healthz answer 200 while every read fails.
        self._store, self._service, self._online, self._plan = store, service, online, plan

    def open(self) -> None:
        """Open the store now if it is not open (the poller calls this, so the first request finds it open)."""
        with self._lock:
            if self._store is None:
                self._open_locked()

    def refresh(self, ttl_s: float = PLAN_TTL_S) -> None:
        """Re-resolve the service's views from the registry when the plan is older than `ttl_s` (the poller;
        off the request path: the new plan replaces the old in one assignment). A registry that cannot be
        read keeps the old plan (logged): the online store may still answer."""
        store, plan = self._store, self._plan
        if store is None or plan is None or time.monotonic() - plan.resolved_at < ttl_s:
            return
        try:
            new = resolve_plan(store, store.get_feature_service(self.service_name))
            self._check_plan(new)
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot re-resolve the FeatureService %s (the old views are kept): %s: %s",
                        self.service_name, type(exc).__name__, exc)
            self._plan = ReadPlan(plan.views, time.monotonic())  # retried after another ttl_s
            return
        if self._store is store:  # not re-opened meanwhile
            self._plan = new

    def _read_locked(self, user_id: int, ids: list[int], token_ids: list[int] | None) -> tuple[dict, dict]:
        """(columns of every feature except the token view's when `token_ids` is given, the token view's
        columns for `token_ids`); the user's views are read for the one user and repeated per candidate."""
        plan, cfg, n = self._plan, self._store.config, len(ids)
        cols: dict[str, list] = {}
        tokens: dict[str, list] = {}
        for v in plan.views:
            if v.key == USER_KEY:
                got = read_view(self._online, cfg, v, [user_id])
                cols.update({f: vals * n for f, vals in got.items()})  # one user: the same row for every candidate
            elif token_ids is not None and v.name == TOKEN_VIEW:
                tokens = read_view(self._online, cfg, v, token_ids) if token_ids else {f: [] for f in v.features}
            else:
                cols.update(read_view(self._online, cfg, v, ids))
        return cols, tokens

    def _read(self, user_id: int, ids: list[int], token_ids: list[int] | None) -> tuple[dict, dict, float]:
        with self._lock:
            if self._store is None:
                self._open_locked()
            t0 = time.perf_counter()
            try:
                cols, tokens = self._read_locked(user_id, ids, token_ids)
            except Exception as exc:  # noqa: BLE001 - whatever the store raised, the request gets a 503
                self._store = self._service = self._online = self._plan = None  # the next read opens a fresh store
                self.error = f"online feature read failed: {type(exc).__name__}: {exc}"
                raise StoreUnavailable(self.error) from exc
            seconds = time.perf_counter() - t0
            self.error = None
        return cols, tokens, seconds

    def read(self, user_id: int, item_ids: Sequence[int], event_time: int) -> OnlineRead:
        """The joined frame of (user_id, item) for every candidate; StoreUnavailable if the store fails."""
        ids = [int(i) for i in item_ids]
        cols, _, seconds = self._read(int(user_id), ids, None)
        return OnlineRead(joined_frame(cols, user_id, ids, event_time), seconds)

    def probe(self) -> bool:
        """One read of a single (user 0, item 0) row: True when the store answers (health checks)."""
        try:
            self.read(0, [0], 0)
        except StoreUnavailable:
            return False
        return True


class CachedOnlineFeatures(OnlineFeatures):
    """OnlineFeatures whose item_tokens features come from `cache` (a KafkaTokenCache), misses from Feast.

    The user's views are read for the one user, the item views other than item_tokens for every
    candidate, item_tokens for the cache misses only (nothing when every candidate is a hit)."""

    def __init__(self, repo: str, cache, service: str = FEATURE_SERVICE):
        super().__init__(repo, service)
        self.cache = cache

    def _check_plan(self, plan: ReadPlan) -> None:
        if not any(v.name == TOKEN_VIEW for v in plan.views):
            raise ValueError(f"the FeatureService {self.service_name} reads no {TOKEN_VIEW} features")

    def read(self, user_id: int, item_ids: Sequence[int], event_time: int) -> OnlineRead:
        ids = [int(i) for i in item_ids]
        n = len(ids)
        cached = [self.cache.get(i) for i in ids]
        misses = [i for i, r in zip(ids, cached) if r is None]
        cols, fallback, seconds = self._read(int(user_id), ids, misses)
        k = 0
        token_cols: dict[str, list] = {c: [None] * n for c in fallback}
        for j, r in enumerate(cached):
            if r is None:  # the store's row (or nulls: no tokens anywhere)
                for c, vals in fallback.items():
                    token_cols[c][j] = vals[k]
                k += 1
            else:
                for c in token_cols:
                    token_cols[c][j] = r.get(c)
        cols.update(token_cols)
        return OnlineRead(joined_frame(cols, user_id, ids, event_time), seconds, n - len(misses), len(misses))
