"""The rig file the hardware-in-the-loop checks read (see hil/README.md)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest


def rig(section: str) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """The rig file's path, its document and its ``[[section]]`` entries; skip without them."""
    path = os.environ.get("SITEAGENT_RIG")
    if not path:
        pytest.skip("no rig: set SITEAGENT_RIG to a rig file (see hil/README.md)")
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    entries: list[dict[str, Any]] = data.get(section, [])
    if not entries:
        pytest.skip(f"rig file {path} lists no [[{section}]]")
    return path, data, entries
