"""Point-in-time training rows from Feast.

Labelled events -> entity dataframe (user_id, item_id, event_timestamp = event time - 1 µs, label)
-> `FeatureStore.get_historical_features(...).to_df()`, returned in the input order.
The 1 µs makes the join see only feature rows stamped strictly before the event, so an event
never sees the state its own label produced (docs/contracts.md, point-in-time rule).

Which features: the repo's FeatureService `FEATURE_SERVICE` (feature_repo/definitions.py), read
from the store's registry, so the trainer and `trm eval` join exactly what the repo declares the
rankers read. Feature names are not prefixed by their view (full_feature_names stays False).
A repo applied before the service existed makes `FeastJoiner` fail at construction (Feast's
FeatureServiceNotFoundException): apply it again (`feast apply`, or streams.feature_repo_tools).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import pandas as pd

from .errors import TrainerError

FEATURE_SERVICE = "ranker_features"  # the FeatureService of feature_repo/definitions.py the join reads
PIT_OFFSET = pd.Timedelta(microseconds=1)
ROW = "trm_row"  # carried through the join to restore the input order


class JoinError(TrainerError, RuntimeError):
    """The point-in-time join did not return one row per event."""


def events_frame(events: Iterable) -> pd.DataFrame:
    """Objects with user_id, item_id, label, event_time (epoch s) -> a frame of those columns."""
    rows = [(int(e.user_id), int(e.item_id), int(e.label), int(e.event_time)) for e in events]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "label", "event_time"])


def entity_frame(events: pd.DataFrame) -> pd.DataFrame:
    """(user_id, item_id, label, event_time) -> Feast entity df with the PIT timestamp and a row id."""
    ts = pd.to_datetime(events["event_time"].astype("int64"), unit="s", utc=True) - PIT_OFFSET
    return pd.DataFrame({
        "user_id": events["user_id"].astype("int64").to_numpy(),
        "item_id": events["item_id"].astype("int64").to_numpy(),
        "event_timestamp": ts.to_numpy(),
        "label": events["label"].astype("int64").to_numpy(),
        "event_time": events["event_time"].astype("int64").to_numpy(),
        ROW: range(len(events)),
    }).assign(event_timestamp=lambda d: pd.to_datetime(d["event_timestamp"], utc=True))


def historical_features(store, events: pd.DataFrame, features=None) -> pd.DataFrame:
    """The point-in-time join of `events`, one row per event, in input order.

    `features`: a Feast FeatureService, a service name, or a list of "view:feature" references;
    None (the default) is the store's `FEATURE_SERVICE`.
    """
    entity = entity_frame(events)
    if entity.empty:
        return entity.drop(columns=[ROW])
    if features is None:
        features = FEATURE_SERVICE
    if isinstance(features, str):
        features = store.get_feature_service(features)
    elif isinstance(features, (list, tuple)):
        features = list(features)
    joined = store.get_historical_features(entity_df=entity, features=features).to_df()
    if len(joined) != len(entity):
        raise JoinError(f"point-in-time join returned {len(joined)} rows for {len(entity)} events")
    return joined.sort_values(ROW, kind="stable").drop(columns=[ROW]).reset_index(drop=True)


def join_in_slices(joiner: Callable[[pd.DataFrame], pd.DataFrame], events: pd.DataFrame, step: int = 20_000,
                   progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """`joiner` over `events` in slices of `step` rows (one Feast query per slice bounds its memory),
    concatenated in input order; `progress(rows joined so far)` after each slice."""
    parts = []
    for s in range(0, len(events), step):
        parts.append(joiner(events.iloc[s:s + step].reset_index(drop=True)))
        if progress is not None:
            progress(min(s + step, len(events)))
    return pd.concat(parts, ignore_index=True) if parts else joiner(events)


class FeastJoiner:
    """The trainer's join step: a FeatureStore plus the FeatureService (or feature list) it reads."""

    def __init__(self, repo_path: str, features: str | Sequence[str] = FEATURE_SERVICE):
        from feast import FeatureStore  # heavy: imported when a trainer is built

        self.store = FeatureStore(repo_path=str(repo_path))
        # a service is looked up once, here: a repo without it fails before any event is consumed
        self.features = self.store.get_feature_service(features) if isinstance(features, str) else tuple(features)

    def __call__(self, events: pd.DataFrame) -> pd.DataFrame:
        return historical_features(self.store, events, self.features)
