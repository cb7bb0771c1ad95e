from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where built artefacts live (the embedded model, compiled CPU kernels); $MOSAIC_CACHE_DIR overrides."""
    return Path(os.environ.get("MOSAIC_CACHE_DIR") or Path.home() / ".cache" / "mosaic-serve")
