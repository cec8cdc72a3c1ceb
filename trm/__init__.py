"""Front door of the project: the `trm` CLI, shared configuration and the dataset loader."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "ml-latest-small"
