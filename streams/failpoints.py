"""Named failpoints: pause a process at an exact point so a fault test can `kill -9` it there.

Call sites put `failpoint("trainer.mid_checkpoint")` (any dotted name) at the point of interest.
In production it is a no-op: one environment lookup, nothing else.

When the environment variable `TRM_FAILPOINT` names this point (a comma-separated list of names
is also accepted), the process writes an empty marker file `<TRM_FAILPOINT_DIR or cwd>/<name>.paused`
and then sleeps up to `TRM_FAILPOINT_SLEEP` seconds (default 120) before carrying on. A test waits
for the marker file to appear and then sends SIGKILL by PID, so the kill lands exactly at that point.
The pause happens once per process (the first time the point is reached); later hits pass through.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["failpoint"]

_fired: set[str] = set()


def failpoint(name: str) -> None:
    """No-op unless `TRM_FAILPOINT` names `name`; then write `<name>.paused` and sleep (<= 120 s)."""
    wanted = os.environ.get("TRM_FAILPOINT")
    if not wanted or name in _fired:
        return
    if name not in {w.strip() for w in wanted.split(",")}:
        return
    _fired.add(name)
    directory = Path(os.environ.get("TRM_FAILPOINT_DIR") or os.getcwd())
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f"{name}.paused"
    marker.write_text(f"{os.getpid()}\n")
    time.sleep(float(os.environ.get("TRM_FAILPOINT_SLEEP", "120")))
