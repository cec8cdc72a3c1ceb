"""Split a MovieLens-layout dataset by user into disjoint parts, each a dataset of the same layout.

Why: the quality report must hold on data it was not tuned on ("tune for ranking, not for one
file"). The parts share movies.csv but not one user, so `trm demo --data PART` on each gives the
same report on a second (and third) stream: different users, a different cutoff, different unseen
items. Tags go with the user who wrote them, so an item's tags, and its creation time (60 s before
its first rating in that part), differ between parts as well; a tag whose user rated nothing is in
no part.

    python bench/split_users.py --data data/ml-latest-small --out /tmp/halves --parts 2 --seed 7
    trm demo --data /tmp/halves/part0 --out /tmp/demo_part0
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

PER_USER = ("ratings.csv", "tags.csv")  # files whose rows belong to a user; the rest are copied whole


def split(data: Path, out: Path, parts: int, seed: int) -> list[Path]:
    """Writes out/part0 .. part{parts-1}; users are dealt to parts at random (seeded), evenly."""
    frames = {name: pd.read_csv(data / name) for name in PER_USER if (data / name).exists()}
    users = np.sort(frames["ratings.csv"]["userId"].unique())
    part_of = dict(zip(np.random.default_rng(seed).permutation(users).tolist(), np.arange(len(users)) % parts))
    dirs = []
    for k in range(parts):
        d = out / f"part{k}"
        d.mkdir(parents=True, exist_ok=False)
        for f in data.iterdir():
            if f.is_file() and f.name not in PER_USER:
                shutil.copy2(f, d / f.name)
        for name, df in frames.items():
            df[df["userId"].map(part_of) == k].to_csv(d / name, index=False)
        dirs.append(d)
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/ml-latest-small"), help="MovieLens-layout directory")
    ap.add_argument("--out", type=Path, required=True, help="new directory for the parts")
    ap.add_argument("--parts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.parts < 2:
        ap.error("--parts must be at least 2")
    if not (args.data / "ratings.csv").is_file():
        ap.error(f"{args.data} holds no ratings.csv: pass a MovieLens-layout directory with --data")
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"{args.out} is not empty: pass a new --out (the parts are never written over)")
    for d in split(args.data, args.out, args.parts, args.seed):
        n = sum(1 for _ in open(d / "ratings.csv")) - 1
        print(f"{d}: {n:,} ratings")


if __name__ == "__main__":
    main()
