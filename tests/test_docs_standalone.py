# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Docs stand alone: no file a user gets (code, tests, docs, README, configs) points to a specification document
they cannot open; each rule is stated where it is used or linked to a file in this repository. (Model cards of
converted folders are checked in test_family_folders.py.)"""

import os
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".sh", ".json", ".yml", ".yaml", ".cfg", ".ini"}
SKIPPED_DIRS = {"__pycache__", "build", "dist", "venv", "out"}  # and every hidden folder (.git, .venv, caches)
# "<the spec> §3", "<the spec>.md", "the <spec> text": the character class keeps this file from matching itself
UNREADABLE_REFERENCE = re.compile(r"SPE[C]\s*§|SPE[C]\.md|\bthe SPE[C]\b")


def shipped_text_files():
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not (d.startswith(".") or d in SKIPPED_DIRS or d.endswith(".egg-info")))
        for name in sorted(names):
            if Path(name).suffix in TEXT_SUFFIXES:
                yield Path(folder) / name


def test_no_file_cites_a_specification_readers_cannot_open():
    files = list(shipped_text_files())
    assert ROOT / "README.md" in files and ROOT / "image_processing_siglip2_navit.py" in files
    assert any(path.parent.name == "tools" for path in files) and any(path.parent.name == "docs" for path in files)
    cited = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if UNREADABLE_REFERENCE.search(line)
    ]
    assert not cited, "state the rule where it is used instead of citing it:\n" + "\n".join(cited)
