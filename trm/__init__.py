"""Front door of the project: the `trm` command (trm/cli/) and the demo (trm/demo/).

Nothing under tokenizer/, streams/, trainer/ or deploy/ imports this package.
"""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "ml-latest-small"


def quiet_third_party_warnings() -> None:
    """Hide the DeprecationWarnings ibis/duckdb/faust print on every Feast join (not ours to fix).

    Feast is imported first: its import installs a "once" DeprecationWarning filter ahead of any
    set before it, which would let the chatter through again."""
    import warnings

    import feast  # noqa: F401

    warnings.filterwarnings("ignore", category=DeprecationWarning)
