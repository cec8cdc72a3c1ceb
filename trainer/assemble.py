"""From settings to a ready `ContinuousTrainer`: tokenizer geometry, Feast joiner, models, checkpoints.

The tokenizer artifact fixes the gen-token geometry (L, K) and the version the features must
carry; nothing else of the tokenizer is needed to train.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .featurizer import Featurizer
from .models import MODEL_NAMES, RankerConfig


@dataclass(frozen=True)
class TokenizerInfo:
    num_levels: int
    codebook_size: int
    version: str | None
    fit_cutoff: int | None = None  # epoch s: items created at/after it were never seen by the fit
    lineage: dict | None = None  # a refit's map from its parent's ids: lets a checkpoint migrate (trainer/migrate.py)


def tokenizer_info(artifact: str | Path, fit_cutoff: int | None = None) -> TokenizerInfo:
    """Geometry and version of a saved HybridTokenizer (verified by its own loader)."""
    from tokenizer.hybrid import HybridTokenizer

    tok = HybridTokenizer.load(artifact, verify_encoder=False)
    cutoff = fit_cutoff if fit_cutoff is not None else (tok.fit_report or {}).get("fit_cutoff")
    return TokenizerInfo(tok.num_levels, tok.codebook_size, tok.version, cutoff, tok.lineage)


def build_trainer(repo: str | Path, tok: TokenizerInfo, checkpoint_dir: str | Path,
                  models: Sequence[str] = MODEL_NAMES, config: dict | None = None, learner: dict | None = None,
                  models_dir: str | Path | None = None, publish_every: int = 0, log_path: str | Path | None = None,
                  checkpoint_every: int = 1, keep_predictions: bool = False, journal_path: str | Path | None = None,
                  peers: dict | None = None, join: str = "index"):
    """A ContinuousTrainer over the Feast repo at `repo` training `models` on the same joined batches.

    `join`: "index" reads each offline part file once and answers recent batches in O(batch)
    (trainer/pit_index.py); "feast" asks Feast's get_historical_features for every batch."""
    from .checkpoint import ModelPublisher
    from .learner import Learner, LearnerConfig
    from .pit_index import joiner_for
    from .prequential import ContinuousTrainer

    cfg = RankerConfig(num_levels=tok.num_levels, codebook_size=tok.codebook_size, **(config or {}))
    lcfg = LearnerConfig(**(learner or {}))
    need_ngrams = any(m in ("two_gram", "prefix_ngram") for m in models)
    featurizer = Featurizer.for_config(cfg, tok.version, ngrams=need_ngrams)
    checkpoint_dir = Path(checkpoint_dir)
    publisher = ModelPublisher(models_dir, publish_every) if models_dir and publish_every else None
    tr = ContinuousTrainer(Learner(list(models), cfg, lcfg), joiner_for(str(repo), join), featurizer, checkpoint_dir,
                           publisher=publisher, log_path=Path(log_path) if log_path else None,
                           journal_path=Path(journal_path) if journal_path else None,
                           checkpoint_every=checkpoint_every, keep_predictions=keep_predictions,
                           peers=dict(peers or {}), lineage=tok.lineage)
    if tok.fit_cutoff is not None:
        tr.state.extra["tokenizer_fit_cutoff"] = int(tok.fit_cutoff)
    return tr
