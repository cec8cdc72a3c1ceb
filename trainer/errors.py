"""The root of every error `trainer/` raises on purpose: `except TrainerError` catches any of them."""


class TrainerError(Exception):
    """Any failure of the trainer: a checkpoint that does not fit, a join that lost rows."""
