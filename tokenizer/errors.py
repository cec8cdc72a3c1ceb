"""The root of every error `tokenizer/` raises on purpose: `except TokenizerError` catches any of them.

`TokenizerError` itself is bad input to fit/encode (its historic meaning, and a `ValueError`);
`ArtifactError` (a saved tokenizer that is missing, tampered or mismatched) and `BPEError` are
its subclasses, so one clause catches "any tokenizer failure". (`manifest.ManifestError` is not one:
the manifest helper also serves the trainer's checkpoints, and the artifact translates it into an
`ArtifactError`.)
"""


class TokenizerError(ValueError):
    """Bad input to fit/encode (no items, a too-small catalogue for the codebook...); the root."""


class ArtifactError(TokenizerError, RuntimeError):
    """A saved tokenizer is missing a file, was tampered with, or does not match what was expected."""
