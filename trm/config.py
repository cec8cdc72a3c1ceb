"""Front-door settings: which Feast repo and tokenizer artifact a `trm` command opens.

Lower layers take these as arguments; only the `trm` commands read the environment for them.
(Kafka settings live beside the Kafka code: `streams/kafka_config.py`.)
"""
from __future__ import annotations

import os
from pathlib import Path

from trm import REPO_ROOT


def feast_repo_path(default: str | os.PathLike | None = None) -> Path:
    """The Feast repo every process opens: `TRM_FEAST_REPO`, else `default`, else `feature_repo/`.

    Production points this at the assembled repo (shared definitions + Redis/Postgres
    feature_store.yaml, see deploy/); the embedded default needs no setting.
    """
    return Path(os.environ.get("TRM_FEAST_REPO") or default or REPO_ROOT / "feature_repo")


def tokenizer_artifact_path(default: str | os.PathLike | None = None) -> Path | None:
    """The tokenizer artifact workers load: `TRM_TOKENIZER_ARTIFACT`, else `default` (may be None).

    Rotating the tokenizer is a deploy of this setting; tokens carry `tokenizer_version`.
    """
    value = os.environ.get("TRM_TOKENIZER_ARTIFACT") or default
    return Path(value) if value else None
