"""Where graftkit keeps what it computes once: converted backbone weights, turn-1 hidden states.

The directory is ``$GRAFTKIT_CACHE`` when that is set, else ``~/.cache/graftkit``.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "GRAFTKIT_CACHE"


def cache_dir() -> Path:
    """The cache directory (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "graftkit")
