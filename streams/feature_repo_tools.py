"""Materialise `feature_repo/` into a work directory and `apply` it there (tests, demo, bench).

The copy is self-contained: definitions derive their parquet paths from their own location, the
registry and SQLite online store are relative to the copy, and every view's offline directory is
seeded with an empty part file so the DuckDB glob matches before the first stream write.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

from .feast_sink import OFFLINE_SCHEMAS, offline_dir

SOURCE_REPO = Path(__file__).resolve().parent.parent / "feature_repo"
REPO_FILES = ("feature_store.yaml", "definitions.py")


def _load_definitions(repo: Path):
    name = f"_trm_feature_repo_{abs(hash(str(repo)))}"
    spec = importlib.util.spec_from_file_location(name, repo / "definitions.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def materialize_repo(work_dir: str | Path, source: str | Path = SOURCE_REPO, apply: bool = True) -> Path:
    """Copy the feature repo into `work_dir` (created), seed offline dirs, `apply`; return the repo path."""
    from feast import Entity, FeatureView, FeatureStore
    from feast.data_source import PushSource

    repo = Path(work_dir).resolve()
    repo.mkdir(parents=True, exist_ok=True)
    src = Path(source)
    for f in REPO_FILES:
        if not (src / f).exists():
            raise FileNotFoundError(f"{src / f} is missing: is {src} the project's feature_repo/?")
        shutil.copy2(src / f, repo / f)
    (repo / "data").mkdir(exist_ok=True)
    for view, schema in OFFLINE_SCHEMAS.items():
        d = offline_dir(repo, view)
        d.mkdir(parents=True, exist_ok=True)
        seed = d / "part-00000000-seed.parquet"
        if not seed.exists():
            pq.write_table(schema.empty_table(), seed)
    if apply:
        mod = _load_definitions(repo)
        objs = [v for v in vars(mod).values() if isinstance(v, (Entity, FeatureView, PushSource))]
        FeatureStore(repo_path=str(repo)).apply(objs)
    return repo
