"""bench/split_users.py: disjoint user parts of a MovieLens-layout dataset, each loadable as one."""
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from split_users import split  # noqa: E402
from streams.movielens import load_movielens  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "ml-latest-small"


def test_parts_partition_the_users_and_load(tmp_path):
    parts = split(DATA, tmp_path / "out", parts=2, seed=7)
    full = pd.read_csv(DATA / "ratings.csv")
    rat = [pd.read_csv(p / "ratings.csv") for p in parts]
    users = [set(r["userId"]) for r in rat]
    assert not users[0] & users[1] and users[0] | users[1] == set(full["userId"])
    assert abs(len(users[0]) - len(users[1])) <= 1
    assert sum(len(r) for r in rat) == len(full)
    tags = [pd.read_csv(p / "tags.csv") for p in parts]
    assert all(set(t["userId"]) <= u for t, u in zip(tags, users))
    full_tags = pd.read_csv(DATA / "tags.csv")
    assert sum(len(t) for t in tags) == full_tags["userId"].isin(set(full["userId"])).sum()
    assert (parts[0] / "movies.csv").read_bytes() == (DATA / "movies.csv").read_bytes()
    ds = load_movielens(parts[1])
    assert len(ds.interactions) == len(rat[1])
    assert split(DATA, tmp_path / "again", parts=2, seed=7)[0].joinpath("ratings.csv").read_bytes() == \
        (parts[0] / "ratings.csv").read_bytes()  # seeded: the same parts every time
