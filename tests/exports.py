"""Test helper: a copy of an export as an older microsr-tf would have written it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def older_export(export: Path, dest: Path, missing: str) -> Path:
    """Copy ``export`` (a versioned model base) to ``dest`` with metadata key ``missing`` removed from
    version 1, as exports made before that key was stored look."""
    shutil.copytree(export, dest)
    meta_file = dest / "1" / "assets.extra" / "microsr_meta.json"
    meta = json.loads(meta_file.read_text())
    del meta[missing]
    meta_file.write_text(json.dumps(meta))
    return dest
