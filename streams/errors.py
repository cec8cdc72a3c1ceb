"""The root of every error `streams/` raises on purpose: `except StreamsError` catches any of them.

Each concrete error also keeps the built-in base it always had (a `DecodeError` is still a
`ValueError`), so older `except` clauses keep working. The messages name the fix.
"""


class StreamsError(Exception):
    """Any failure of the streaming layer: bad bytes or content, the broker, the worker's settings."""
