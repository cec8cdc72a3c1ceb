"""Feast definitions (docs/contracts.md): entities item/user; views item_tokens, user_history, item_stats;
the feature service ranker_features (what the trainer's point-in-time join and `trm eval` read).

Only definitions live in this folder: `feast apply` imports every .py here.

Offline data is a *directory of parquet part files* per view (`data/offline/<view>/*.parquet`),
read by the DuckDB offline store through a glob. The stream appends one part file per batch, so
an offline write costs O(batch) — Feast's own offline push rewrites the whole file every call.
Paths are absolute, derived from this file's location, so a copy of the folder is self-contained.
Every row carries `event_timestamp` (the event time that produced the value) and `created`
(when it was written: among rows with the same event time the later write wins).
The stream's parquet part-file schema is derived from these views (streams/feast_sink.py), so a
field's Feast type here is also its column type on disk.
"""
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Array, Bool, Int64, String

OFFLINE_DIR = Path(__file__).resolve().parent / "data" / "offline"


def _source(view: str) -> FileSource:
    return FileSource(
        name=f"{view}_parts",
        path=str(OFFLINE_DIR / view / "*.parquet"),
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
    )


item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="A catalogue item (movie).")
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="A user.")

item_tokens_push = PushSource(name="item_tokens_push", batch_source=_source("item_tokens"))
user_history_push = PushSource(name="user_history_push", batch_source=_source("user_history"))
item_stats_push = PushSource(name="item_stats_push", batch_source=_source("item_stats"))

item_tokens = FeatureView(
    name="item_tokens",
    entities=[item],
    ttl=timedelta(0),  # never expires: an item's tokens stay valid until re-tokenized
    schema=[
        Field(name="gen_tokens", dtype=Array(Int64)),
        Field(name="mem_tokens", dtype=Array(Int64)),
        Field(name="coarse_tokens", dtype=Array(Int64)),  # nearest level-1 codes, nearest first
        Field(name="lexical_tokens", dtype=Array(Int64)),  # the item event's categories and title words hashed, its release year (tokenizer/lexical.py)
        Field(name="tokenizer_version", dtype=String),
        Field(name="created_at", dtype=Int64),
        Field(name="retired", dtype=Bool),
    ],
    source=item_tokens_push,
    online=True,
)

user_history = FeatureView(
    name="user_history",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="hist_gen_tokens", dtype=Array(Int64)),
        Field(name="hist_item_ids", dtype=Array(Int64)),
        Field(name="user_n_events", dtype=Int64),
        Field(name="user_n_positives", dtype=Int64),
        # the user's last R applied events, positives and negatives, oldest first (R = recent_len):
        Field(name="recent_item_ids", dtype=Array(Int64)),
        Field(name="recent_gen_tokens", dtype=Array(Int64)),  # L per event, flattened (-1 x L: not known)
        Field(name="recent_labels", dtype=Array(Int64)),  # 0/1
        Field(name="last_event_time", dtype=Int64),  # the user's newest event (epoch s): recency
        # the artifact whose gen-tokens the row holds (all of them: docs/rotation.md); null: not recorded
        Field(name="tokenizer_version", dtype=String),
    ],
    source=user_history_push,
    online=True,
)

item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="item_n_interactions", dtype=Int64),
        Field(name="item_n_positives", dtype=Int64),
    ],
    source=item_stats_push,
    online=True,
)

# The features the rankers read (trainer/featurizer.py READS), the user's recent labelled events
# and recency (recent_*, last_event_time; for rankers that read them) and the item age the metrics
# bucket by (created_at). The trainer fetches this service by name (trainer/pit_join.py FEATURE_SERVICE).
ranker_features = FeatureService(
    name="ranker_features",
    features=[
        item_tokens[["gen_tokens", "mem_tokens", "coarse_tokens", "lexical_tokens", "tokenizer_version",
                     "created_at", "retired"]],
        user_history[["hist_gen_tokens", "hist_item_ids", "user_n_events", "user_n_positives",
                      "recent_item_ids", "recent_gen_tokens", "recent_labels", "last_event_time"]],
        item_stats[["item_n_interactions", "item_n_positives"]],
    ],
    description="Point-in-time features of the continuous trainer and `trm eval`.",
)
