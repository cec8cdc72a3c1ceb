"""Typed items and interactions from any directory in the MovieLens `ml-latest-small` layout.

MovieLens has no item publish time, so an item's `created_at` is one minute before its first
rating: the moment the catalogue "learned" of it. That makes item age at event time meaningful
and lets a replay publish each item (and its tokens reach the store) before its first interaction.

An item carries only what was known when it was published: tags dated after `created_at` are
left out. Most tags are written long after an item's first rating (97 % here, 58 % after the
demo's cutoff) and are often verdicts ("masterpiece"); in the item text they would let tokens
encode judgements made after the events those tokens score (a point-in-time leak).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from streams.errors import StreamsError

PUBLISH_LEAD_S = 60  # an item is published this long before its first rating
POSITIVE_RATING = 4.0  # rating >= 4 is a positive (label 1), as is common for MovieLens CTR-style tasks


class DataError(StreamsError, ValueError):
    """The data directory is missing files or holds malformed rows."""


@dataclass(frozen=True)
class Item:
    item_id: int
    title: str
    genres: tuple[str, ...]
    tags: tuple[str, ...]
    created_at: int  # epoch seconds

    def text(self) -> str:
        """What the content encoder reads: title + genres + tags."""
        parts = [self.title]
        if self.genres:
            parts.append("Genres: " + ", ".join(self.genres))
        if self.tags:
            parts.append("Tags: " + ", ".join(self.tags))
        return ". ".join(parts)


@dataclass(frozen=True)
class Interaction:
    user_id: int
    item_id: int
    rating: float
    label: int
    event_time: int  # epoch seconds


@dataclass
class Dataset:
    items: dict[int, Item]
    interactions: list[Interaction] = field(default_factory=list)  # sorted by event_time

    def time_quantile(self, q: float) -> int:
        """Event time at quantile q of the interaction timeline (e.g. 0.5 → the cutoff)."""
        times = sorted(i.event_time for i in self.interactions)
        return times[min(len(times) - 1, int(q * len(times)))]

    def split(self, cutoff: int) -> tuple["Dataset", "Dataset"]:
        """(before, after): interactions and items created strictly before / at-or-after cutoff."""
        before = Dataset(
            {k: v for k, v in self.items.items() if v.created_at < cutoff},
            [i for i in self.interactions if i.event_time < cutoff],
        )
        after = Dataset(
            {k: v for k, v in self.items.items() if v.created_at >= cutoff},
            [i for i in self.interactions if i.event_time >= cutoff],
        )
        return before, after


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path} is missing: a MovieLens-layout directory needs movies.csv and ratings.csv")
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for bad CSV
        raise DataError(f"{path} is not a readable CSV: {exc}") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing}; expected {required}")
    return df


def load_movielens(data_dir: str | Path, positive_rating: float = POSITIVE_RATING,
                   max_tags: int = 8) -> Dataset:
    """Read movies.csv, ratings.csv and optional tags.csv; items never rated are dropped.

    An item's tags are those dated no later than its publish time (`created_at`)."""
    d = Path(data_dir)
    movies = _read_csv(d / "movies.csv", ["movieId", "title", "genres"])
    ratings = _read_csv(d / "ratings.csv", ["userId", "movieId", "rating", "timestamp"])
    try:
        ratings = ratings.astype({"userId": "int64", "movieId": "int64", "rating": "float64", "timestamp": "int64"})
        movies = movies.astype({"movieId": "int64"})
    except (ValueError, TypeError) as exc:
        raise DataError(f"{d}: non-numeric ids, ratings or timestamps ({exc})") from exc

    first_seen = ratings.groupby("movieId")["timestamp"].min().to_dict()
    tags: dict[int, list[str]] = {}
    if (d / "tags.csv").exists():
        tdf = _read_csv(d / "tags.csv", ["userId", "movieId", "tag", "timestamp"])
        tdf = tdf.dropna(subset=["tag"])
        tdf["tag"] = tdf["tag"].astype(str).str.strip().str.lower()
        published = tdf["movieId"].map(first_seen) - PUBLISH_LEAD_S
        tdf = tdf[pd.to_numeric(tdf["timestamp"], errors="coerce") <= published]  # known when published
        # most-used tags first, so the text keeps the descriptive ones under max_tags
        counts = tdf.groupby(["movieId", "tag"]).size().reset_index(name="n")
        counts = counts.sort_values(["movieId", "n", "tag"], ascending=[True, False, True])
        for mid, grp in counts.groupby("movieId"):
            tags[int(mid)] = list(grp["tag"].head(max_tags))

    items: dict[int, Item] = {}
    for row in movies.itertuples(index=False):
        mid = int(row.movieId)
        if mid not in first_seen:
            continue
        genres = tuple(g for g in str(row.genres).split("|") if g and g != "(no genres listed)")
        items[mid] = Item(mid, str(row.title), genres, tuple(tags.get(mid, ())),
                          int(first_seen[mid]) - PUBLISH_LEAD_S)

    ratings = ratings[ratings["movieId"].isin(items.keys())]
    ratings = ratings.sort_values(["timestamp", "userId", "movieId"], kind="stable")
    interactions = [
        Interaction(int(u), int(m), float(r), int(r >= positive_rating), int(t))
        for u, m, r, t in zip(ratings["userId"], ratings["movieId"], ratings["rating"], ratings["timestamp"])
    ]
    if not interactions:
        raise DataError(f"{d}/ratings.csv has no ratings of known movies")
    return Dataset(items, interactions)
