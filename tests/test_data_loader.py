"""The MovieLens-layout loader: typed records, event-time order, clear errors on bad data."""
from pathlib import Path

import pytest

from streams.movielens import PUBLISH_LEAD_S, DataError, load_movielens
from trm import DEFAULT_DATA_DIR


@pytest.fixture(scope="module")
def ds():
    return load_movielens(DEFAULT_DATA_DIR)


def test_counts_match_the_vendored_readme(ds):
    assert len(ds.interactions) == 100836
    assert len(ds.items) == 9724  # 9742 movies, 18 never rated


def test_interactions_are_in_event_time_order_and_labelled(ds):
    times = [i.event_time for i in ds.interactions]
    assert times == sorted(times)
    assert all(i.label == int(i.rating >= 4.0) for i in ds.interactions[:1000])


def test_item_is_created_before_its_first_rating(ds):
    first = {}
    for i in ds.interactions:
        first.setdefault(i.item_id, i.event_time)
    assert all(ds.items[m].created_at == t - PUBLISH_LEAD_S for m, t in first.items())


def test_text_carries_title_and_genres(ds):
    toy = ds.items[1]
    assert toy.text().startswith("Toy Story (1995). Genres: Adventure, Animation")


def test_item_text_holds_only_tags_known_when_it_was_published(ds):
    """Point-in-time: a tag written after the item's publish time never reaches its text (tokens)."""
    import pandas as pd

    tags = pd.read_csv(DEFAULT_DATA_DIR / "tags.csv").dropna(subset=["tag"])
    tags["tag"] = tags["tag"].astype(str).str.strip().str.lower()
    tagged = 0
    for item in ds.items.values():
        mine = tags[tags["movieId"] == item.item_id] if item.tags else None
        for tag in item.tags:
            assert (mine[mine["tag"] == tag]["timestamp"] <= item.created_at).any(), (item.item_id, tag)
        tagged += bool(item.tags)
    late = tags[tags["timestamp"] > tags["movieId"].map({i: it.created_at for i, it in ds.items.items()})]
    assert len(late) > 3000  # most tags of the vendored data are written later: all of those are left out
    assert 0 < tagged < 100


def test_late_tags_are_left_out(tmp_path: Path):
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n7,B (2001),Comedy\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,7,4.5,1000\n")
    (tmp_path / "tags.csv").write_text("userId,movieId,tag,timestamp\n2,7,early,900\n3,7,masterpiece,1001\n")
    item = load_movielens(tmp_path).items[7]
    assert item.created_at == 1000 - PUBLISH_LEAD_S and item.tags == ("early",)
    assert "masterpiece" not in item.text()


def test_split_partitions_timeline(ds):
    cutoff = ds.time_quantile(0.5)
    before, after = ds.split(cutoff)
    assert len(before.interactions) + len(after.interactions) == len(ds.interactions)
    assert max(i.event_time for i in before.interactions) < cutoff <= min(i.event_time for i in after.interactions)
    assert set(before.items).isdisjoint(after.items)


def test_missing_file_names_the_layout(tmp_path: Path):
    with pytest.raises(DataError, match="movies.csv"):
        load_movielens(tmp_path)


def test_malformed_ratings_are_rejected(tmp_path: Path):
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n1,A (2000),Drama\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,five,123\n")
    with pytest.raises(DataError, match="non-numeric"):
        load_movielens(tmp_path)


def test_other_dataset_in_same_layout_without_tags(tmp_path: Path):
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n7,B (2001),Comedy|Drama\n8,C (2002),(no genres listed)\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,7,4.5,200\n2,8,2.0,100\n")
    ds = load_movielens(tmp_path)
    assert [i.item_id for i in ds.interactions] == [8, 7]
    assert ds.items[8].genres == () and ds.items[7].tags == ()
