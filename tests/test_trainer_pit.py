"""Point-in-time joins through a real Feast repo: future values and the event's own label never leak."""
import pytest

from tests.trainer_fixtures import (
    T0,
    TOKENIZER_VERSION,
    Event,
    coarse_tokens,
    event_stream,
    feature_rows,
    item_tokens,
    make_repo,
)
from trainer.pit_join import entity_frame, events_frame, historical_features

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stream():
    return event_stream(300)


@pytest.fixture(scope="module")
def store(tmp_path_factory, stream):
    from feast import FeatureStore

    from streams.feast_sink import FeastSink

    repo = make_repo(tmp_path_factory.mktemp("pit"), stream)
    sink = FeastSink(repo)
    probe = stream[150]
    # Planted future values: stamped at the probe's own event time and later. None may be seen.
    sink.write("user_history", [dict(user_id=probe.user_id, hist_gen_tokens=[0, 16, 32], hist_item_ids=[999_999],
                                     user_n_events=10**6, user_n_positives=10**6, event_timestamp=probe.event_time)],
               online=False)
    sink.write("item_stats", [dict(item_id=probe.item_id, item_n_interactions=10**6, item_n_positives=10**6,
                                   event_timestamp=probe.event_time + 1)], online=False)
    sink.write("item_tokens", [dict(item_id=probe.item_id, gen_tokens=[15, 31, 47], mem_tokens=[7],
                                    coarse_tokens=[15, 9, 8],
                                    tokenizer_version="future-version", created_at=0, retired=True,
                                    event_timestamp=probe.event_time + 3600)], online=False)
    return FeatureStore(repo_path=str(repo))


def test_entity_timestamp_is_event_time_minus_one_microsecond():
    ent = entity_frame(events_frame([Event(1, 2, 1, T0)]))
    assert ent["event_timestamp"].iloc[0].value == T0 * 10**9 - 1000  # ns


def test_planted_future_values_are_never_seen(store, stream):
    probe = stream[150]
    events = stream[140:160]
    df = historical_features(store, events_frame(events))
    assert list(df["item_id"]) == [e.item_id for e in events]  # input order restored
    assert list(df["event_time"]) == [e.event_time for e in events]
    assert (df["user_n_events"].fillna(0) < 10**6).all()
    assert (df["item_n_interactions"].fillna(0) < 10**6).all()
    assert not (df["tokenizer_version"] == "future-version").any()
    row = df.iloc[10]
    assert row["item_id"] == probe.item_id and list(row["gen_tokens"]) == item_tokens(probe.item_id)[0]
    assert list(row["coarse_tokens"]) == coarse_tokens(probe.item_id)  # the item's tokens as published, not later ones
    assert 999_999 not in list(row["hist_item_ids"] if row["hist_item_ids"] is not None else [])
    # the same entities asked for *after* the planted time do see them: the plant is real
    # (stream events are 10 s apart, so nothing else lands between the plant and these probes)
    later = [Event(probe.user_id, probe.item_id, 0, probe.event_time + dt) for dt in (1, 2, 3601)]
    seen = historical_features(store, events_frame(later))
    assert seen["user_n_events"].iloc[0] == 10**6
    assert seen["item_n_interactions"].iloc[1] == 10**6
    assert seen["tokenizer_version"].iloc[2] == "future-version"
    assert list(seen["coarse_tokens"].iloc[2]) == [15, 9, 8]


def test_own_label_never_leaks(store, stream):
    events = stream[:150]  # before the planted rows
    df = historical_features(store, events_frame(events))
    before_u, before_i = {}, {}
    for e, (_, row) in zip(events, df.iterrows()):
        n, pos = before_u.get(e.user_id, (0, 0))
        assert row["user_n_events"] == n or (n == 0 and row["user_n_events"] != row["user_n_events"])
        assert (row["user_n_positives"] if row["user_n_positives"] == row["user_n_positives"] else 0) == pos
        ni, pi = before_i.get(e.item_id, (0, 0))
        got = row["item_n_positives"] if row["item_n_positives"] == row["item_n_positives"] else 0
        assert got == pi  # counts of strictly earlier events: the row's own label is not in them
        before_u[e.user_id] = (n + 1, pos + e.label)
        before_i[e.item_id] = (ni + 1, pi + e.label)
    assert (df["tokenizer_version"] == TOKENIZER_VERSION).all()  # items exist 60 s before first use
    assert len(feature_rows(events)["user_history"]) == len(events)
