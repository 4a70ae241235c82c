"""Where things live: the checkout's elements, overlays and labs, and the build tree."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ELEMENTS = ROOT / "elements"
OVERLAYS = Path(os.environ.get("PVELAB_OVERLAYS_DIR", ROOT / "overlays"))  # benchmarks point it at a copy
LABS = ROOT / "labs"
DEFAULT_LAB = LABS / "proxmox-3node-cluster.yaml"


def build_root() -> Path:
    """Output tree (git-ignored); PVELAB_BUILD_DIR moves it, e.g. to a bigger disk."""
    return Path(os.environ.get("PVELAB_BUILD_DIR", ROOT / "build"))


def cache_dir() -> Path:
    return Path(os.environ.get("PVELAB_CACHE_DIR", build_root() / "cache"))
