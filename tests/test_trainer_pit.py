"""Point-in-time joins through a real Feast repo: future values and the event's own label never leak."""
import pytest

from tests.trainer_fixtures import (
    T0,
    TOKENIZER_VERSION,
    Event,
    lexical_tokens,
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
                                    coarse_tokens=[15, 9, 8], lexical_tokens=FUTURE_CATEGORIES,
                                    tokenizer_version="future-version", created_at=0, retired=True,
                                    event_timestamp=probe.event_time + 3600)], online=False)
    # another item re-published with new categories in the very second of one of its events (all else
    # as published): that event, and every earlier one, must still read the categories it had before
    same = stream[SAME_SECOND]
    gen, mem = item_tokens(same.item_id)
    sink.write("item_tokens", [dict(item_id=same.item_id, gen_tokens=gen, mem_tokens=mem,
                                    coarse_tokens=coarse_tokens(same.item_id), lexical_tokens=SAME_SECOND_CATEGORIES,
                                    tokenizer_version=TOKENIZER_VERSION, retired=False,
                                    created_at=next(e.event_time for e in stream if e.item_id == same.item_id) - 60,
                                    event_timestamp=same.event_time)], online=False)
    return FeatureStore(repo_path=str(repo))


FUTURE_CATEGORIES = [2**26 - 1, 2**26 - 2]  # no genre hashes to these (tests/trainer_fixtures.GENRES)
SAME_SECOND, SAME_SECOND_CATEGORIES = 145, [2**26 - 3, 2**27 + 1901]  # a category and a release year (1901)


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
    assert list(row["lexical_tokens"]) == lexical_tokens(probe.item_id)
    assert 999_999 not in list(row["hist_item_ids"] if row["hist_item_ids"] is not None else [])
    # the same entities asked for *after* the planted time do see them: the plant is real
    # (stream events are 10 s apart, so nothing else lands between the plant and these probes)
    later = [Event(probe.user_id, probe.item_id, 0, probe.event_time + dt) for dt in (1, 2, 3601)]
    seen = historical_features(store, events_frame(later))
    assert seen["user_n_events"].iloc[0] == 10**6
    assert seen["item_n_interactions"].iloc[1] == 10**6
    assert seen["tokenizer_version"].iloc[2] == "future-version"
    assert list(seen["coarse_tokens"].iloc[2]) == [15, 9, 8]
    assert list(seen["lexical_tokens"].iloc[2]) == FUTURE_CATEGORIES
    assert list(seen["lexical_tokens"].iloc[1]) == lexical_tokens(probe.item_id)  # 2 s after: not the plant yet


def test_planted_lexical_tokens_are_never_seen_early_nor_in_their_own_second(store, stream):
    """Category tokens re-published at an event's own second: that event and every earlier one read
    the ones published before; the next second reads the new ones (the plant is real)."""
    same = stream[SAME_SECOND]
    df = historical_features(store, events_frame(stream[:200]))
    planted = [list(v) == SAME_SECOND_CATEGORIES for v in df["lexical_tokens"]]
    for e, got, p in zip(stream[:200], df["lexical_tokens"], planted):
        if e.item_id == same.item_id and e.event_time > same.event_time:
            assert p, e  # a later event of the item reads the re-published categories
        else:
            assert not p and list(got) == lexical_tokens(e.item_id), e
    assert sum(1 for e in stream[:200] if e.item_id == same.item_id and e.event_time > same.event_time) >= 1
    seen = historical_features(store, events_frame([Event(same.user_id, same.item_id, 0, same.event_time + dt)
                                                    for dt in (0, 1)]))
    assert list(seen["lexical_tokens"].iloc[0]) == lexical_tokens(same.item_id)  # its own second: before
    assert list(seen["lexical_tokens"].iloc[1]) == SAME_SECOND_CATEGORIES


def fixture_year(item_id: int) -> int | None:
    """The release year in the fixture's title (tests/trainer_fixtures.lexical_tokens), computed apart."""
    return 1950 + 7 * item_id % 70 if item_id % 4 else None


def test_era_keys_read_the_title_published_before_the_events_second(store, stream):
    """The era keys (decade, release age at the event) of an event come from the item's title as
    published strictly before its second: a year re-published in the event's own second is seen from
    the next second on. (No label is among era_keys' inputs: the lexical row and the event time.)"""
    from tests.trainer_fixtures import featurizer, small_config

    same = stream[SAME_SECOND]
    events = stream[:200]
    df = historical_features(store, events_frame(events))
    era = featurizer(small_config())(df)[0].era.tolist()
    year_s = 365.2425 * 86400
    n_later = 0
    for e, got in zip(events, era):
        year = fixture_year(e.item_id)
        if e.item_id == same.item_id and e.event_time > same.event_time:
            year, n_later = 1901, n_later + 1  # the re-published title's year
        if year is None:
            assert got == [-1, -1], e
            continue
        age = 1970 + e.event_time / year_s - year
        assert got == [year // 10, sum(age >= edge for edge in (1, 2, 4, 8, 16, 32))], e
    assert n_later >= 1 and any(g[0] >= 0 for g in era) and any(g[0] < 0 for g in era)


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
