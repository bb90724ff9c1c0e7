"""Where largewave caches what it can rebuild: the demo's MIDI source, compiled kernels, the
precision probe. One rule: ``$LARGEWAVE_CACHE``, else ``$XDG_CACHE_HOME/largewave``, else
``~/.cache/largewave``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("LARGEWAVE_CACHE"):
        return Path(os.environ["LARGEWAVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "largewave"
