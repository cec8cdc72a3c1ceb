"""Front door of the project: the `trm` command (trm/cli/) and the demo (trm/demo/).

Nothing under tokenizer/, streams/, trainer/ or deploy/ imports this package.
"""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "ml-latest-small"
