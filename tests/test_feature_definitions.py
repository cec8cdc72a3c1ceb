"""feature_repo/definitions.py is the one declaration: the parquet part files and the trainer's join follow it.

* the part-file schemas derived from the FeatureViews are exactly the ones the stream always wrote,
  plus the user's recent labelled events and recency appended to user_history;
* the `ranker_features` FeatureService names exactly what the featurizer reads (plus the item age
  the metrics bucket by), in the order of the feature list the trainer joined before it existed,
  with the recent_* features and last_event_time after the user counts.
"""
import pyarrow as pa
import pytest

from streams.feast_sink import (
    JOIN_KEYS,
    OFFLINE_SCHEMAS,
    FeatureDefinitionError,
    offline_schema,
    schemas_from_definitions,
)
from streams.feature_repo_tools import SOURCE_REPO, load_definitions
from tests.trainer_fixtures import event_stream, featurizer, joined_frame, make_repo, small_config
from trainer.featurizer import READS
from trainer.pit_join import FEATURE_SERVICE

TS = pa.timestamp("us", tz="UTC")
I64_LIST = pa.list_(pa.int64())
# the literal schemas streams/feast_sink.py declared before they were derived from the views (user_history:
# with the five features added since at its end)
DECLARED = {
    "item_tokens": pa.schema([("item_id", pa.int64()), ("gen_tokens", I64_LIST), ("mem_tokens", I64_LIST),
                              ("coarse_tokens", I64_LIST), ("lexical_tokens", I64_LIST),
                              ("tokenizer_version", pa.string()), ("created_at", pa.int64()),
                              ("retired", pa.bool_()), ("event_timestamp", TS), ("created", TS)]),
    "user_history": pa.schema([("user_id", pa.int64()), ("hist_gen_tokens", I64_LIST),
                               ("hist_item_ids", I64_LIST), ("user_n_events", pa.int64()),
                               ("user_n_positives", pa.int64()), ("recent_item_ids", I64_LIST),
                               ("recent_gen_tokens", I64_LIST), ("recent_labels", I64_LIST),
                               ("last_event_time", pa.int64()), ("tokenizer_version", pa.string()),
                               ("event_timestamp", TS), ("created", TS)]),
    "item_stats": pa.schema([("item_id", pa.int64()), ("item_n_interactions", pa.int64()),
                             ("item_n_positives", pa.int64()), ("event_timestamp", TS), ("created", TS)]),
}
# the feature references the trainer joined before the FeatureService (trainer/batch.py FEATURES)
JOINED_BEFORE = (
    "item_tokens:gen_tokens", "item_tokens:mem_tokens", "item_tokens:tokenizer_version",
    "item_tokens:created_at", "item_tokens:retired",
    "user_history:hist_gen_tokens", "user_history:hist_item_ids",
    "user_history:user_n_events", "user_history:user_n_positives",
    "item_stats:item_n_interactions", "item_stats:item_n_positives",
)
# the service: that list, the user's recent labelled events and recency after the user counts
SERVICE = JOINED_BEFORE[:2] + ("item_tokens:coarse_tokens", "item_tokens:lexical_tokens") + JOINED_BEFORE[2:9] + (
    "user_history:recent_item_ids", "user_history:recent_gen_tokens", "user_history:recent_labels",
    "user_history:last_event_time") + JOINED_BEFORE[9:]
METRIC_COLUMNS = ("created_at",)  # read by trainer.metrics.summarize (item age), not by the featurizer


@pytest.fixture(scope="module")
def definitions():
    return load_definitions(SOURCE_REPO)


def test_derived_part_file_schemas_are_the_declared_ones(definitions):
    assert list(OFFLINE_SCHEMAS) == list(DECLARED)  # also the order compaction walks the views in
    for view, schema in DECLARED.items():
        assert OFFLINE_SCHEMAS[view].equals(schema, check_metadata=True), view
        assert OFFLINE_SCHEMAS[view].names == schema.names
    assert schemas_from_definitions(vars(definitions).values()) == OFFLINE_SCHEMAS


def test_join_keys_are_the_views_entities(definitions):
    from feast import Entity, FeatureView

    objs = vars(definitions).values()
    entities = {o.name: o for o in objs if isinstance(o, Entity)}
    views = {o.name: o for o in objs if isinstance(o, FeatureView)}
    assert {v: entities[fv.entities[0]].join_key for v, fv in views.items()} == JOIN_KEYS


def test_unmapped_feast_type_names_the_view_and_field(definitions):
    from feast import FeatureView, Field
    from feast.types import Float32

    bad = FeatureView(name="bad", entities=[definitions.item], schema=[Field(name="score", dtype=Float32)],
                      source=definitions.item_stats_push)
    with pytest.raises(FeatureDefinitionError, match="view bad, feature score"):
        offline_schema(bad, definitions.item)


def test_feature_service_is_what_the_featurizer_reads(definitions):
    from feast import FeatureService

    services = [o for o in vars(definitions).values() if isinstance(o, FeatureService)]
    assert [s.name for s in services] == [FEATURE_SERVICE]
    refs = tuple(f"{p.name}:{f.name}" for p in services[0].feature_view_projections for f in p.features)
    assert refs == SERVICE  # the columns, in the order, of the list it replaced, then the recent ones
    names = [r.split(":")[1] for r in refs]
    assert len(set(names)) == len(names) and set(names) == set(READS) | set(METRIC_COLUMNS)


def test_featurizer_reads_exactly_its_columns():
    import torch

    cfg = small_config()
    fz = featurizer(cfg)
    df = joined_frame(40)
    df.loc[df.index[1::7], "retired"] = True
    base = ["user_id", "item_id", "label", "event_time"]

    def run(frame):
        b, st = fz(frame)
        return {k: v for k, v in vars(b).items() if v is not None}, vars(st)

    full = run(df)
    only = run(df[base + list(READS)])
    assert only[1] == full[1] and all(torch.equal(only[0][k], full[0][k]) for k in full[0])
    for c in READS:  # every one of them is read: dropping it changes the batch or its stats
        b, st = run(df.drop(columns=[c]))
        assert st != full[1] or not all(torch.equal(b[k], full[0][k]) for k in full[0]), c


@pytest.mark.integration
def test_the_store_agrees_with_the_definitions(tmp_path):
    """In an applied repo: the sink's registry-derived schemas are OFFLINE_SCHEMAS, and the join through
    the service returns the frame the feature list returned (same columns, names, order, values)."""
    import pandas as pd

    from streams.feast_sink import FeastSink
    from trainer.pit_join import FeastJoiner, events_frame, historical_features

    stream = event_stream(120)
    repo = make_repo(tmp_path, stream)
    assert FeastSink(repo).schemas == OFFLINE_SCHEMAS
    joiner = FeastJoiner(str(repo))
    assert joiner.features.name == FEATURE_SERVICE
    events = events_frame(stream[::-1])  # not in time order: the input order must come back
    by_service = joiner(events)
    by_list = historical_features(joiner.store, events, list(SERVICE))
    assert list(by_service.columns) == list(by_list.columns)
    assert not any(":" in c or "__" in c for c in by_service.columns)
    pd.testing.assert_frame_equal(by_service, by_list)
    assert by_service["event_time"].tolist() == events["event_time"].tolist()
