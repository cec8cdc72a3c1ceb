"""Materialise `feature_repo/` into a work directory and `apply` it there (tests, demo, bench).

The copy is self-contained: definitions derive their parquet paths from their own location, the
registry and SQLite online store are relative to the copy, and every view's offline directory is
seeded with an empty part file so the DuckDB glob matches before the first stream write. The seed
files take their schema from the copied definitions (streams.feast_sink.schemas_from_definitions).
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

from .errors import StreamsError
from .feast_sink import offline_dir, schemas_from_definitions

SOURCE_REPO = Path(__file__).resolve().parent.parent / "feature_repo"
REPO_FILES = ("feature_store.yaml", "definitions.py")


class DefinitionsNotFound(StreamsError, FileNotFoundError):
    """No feature_repo/definitions.py where the project's definitions should be."""


def load_definitions(repo: Path):
    """Import `repo`/definitions.py as a fresh module (feast objects; nothing is applied)."""
    name = f"_trm_feature_repo_{abs(hash(str(repo)))}"
    spec = importlib.util.spec_from_file_location(name, repo / "definitions.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def project_definitions():
    """The project's feature definitions: feature_repo/definitions.py of the source tree.

    An installed copy of `streams` (the image's `pip install .`) has no feature_repo/ beside it:
    there, pass the repo (every materialized repo holds its copy of definitions.py)."""
    if not (SOURCE_REPO / "definitions.py").is_file():
        raise DefinitionsNotFound(f"no Feast definitions.py in {SOURCE_REPO}: run from a source checkout, "
                                  "or read the schemas of a materialized repo (feast_sink.offline_schemas(repo))")
    return load_definitions(SOURCE_REPO)


def materialize_repo(work_dir: str | Path, source: str | Path = SOURCE_REPO, apply: bool = True) -> Path:
    """Copy the feature repo into `work_dir` (created), seed offline dirs, `apply`; return the repo path."""
    from feast import Entity, FeatureService, FeatureStore, FeatureView
    from feast.data_source import PushSource

    repo = Path(work_dir).resolve()
    repo.mkdir(parents=True, exist_ok=True)
    src = Path(source)
    for f in REPO_FILES:
        if not (src / f).exists():
            raise FileNotFoundError(f"{src / f} is missing: is {src} the project's feature_repo/?")
        shutil.copy2(src / f, repo / f)
    (repo / "data").mkdir(exist_ok=True)
    mod = load_definitions(repo)
    for view, schema in schemas_from_definitions(vars(mod).values()).items():
        d = offline_dir(repo, view)
        d.mkdir(parents=True, exist_ok=True)
        seed = d / "part-00000000-seed.parquet"
        if not seed.exists():
            pq.write_table(schema.empty_table(), seed)
    if apply:
        objs = [v for v in vars(mod).values() if isinstance(v, (Entity, FeatureView, PushSource, FeatureService))]
        FeatureStore(repo_path=str(repo)).apply(objs)
    return repo
