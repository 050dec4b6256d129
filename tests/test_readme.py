# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The model card (README.md) is accurate: every ```python block runs against tiny local models, the front matter
is a valid Hub card header, the CI commands are intact and relative links resolve.

A block is skipped only when the line right before it is `<!-- skip-test: needs GPU -->`,
`<!-- skip-test: needs network -->` or `<!-- skip-test: needs Ray, run by tests/… -->` (that test module runs it).
Placeholders are replaced by tiny random checkpoints built here:
`"path/or/hub-id"` (Ovis2.5-style: RoPE, hidden_stride 2), `"path/to/siglip2-navit-naflex"` (a converted
transformers Siglip2VisionModel: MAP head, hidden_stride 1) and the other families' converted folders
(`FAMILY_FOLDERS`).
"""

import contextlib
import importlib
import io
import os
import re
import sys
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

from siglip2_navit.tools import checkpoint_utils as utils  # noqa: E402
from siglip2_navit.tools import convert_siglip2_naflex  # noqa: E402


FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"<!--\s*skip-test:\s*(.*?)\s*-->\s*$")
CI_COMMANDS = {
    "<!-- ci:demo -->": "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install . "
    "&& navit-encode examples/*.jpg examples/*.png",
    "<!-- ci:test -->": "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    'pip install -e ".[dev]" && python -m pytest -q',
}


# README placeholders of the other families -> the test module whose `readme_folder(base)` builds a tiny converted folder
FAMILY_FOLDERS = {"path/to/aimv2-navit": "test_aimv2", "path/to/dinov3-navit": "test_dinov3"}


def code_blocks(text):
    """(language, code, line number, skip reason or None) for every fenced block."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((match.group(1), match.group(2), line, skip.group(1) if skip else None))
    return blocks


TEXT = README.read_text(encoding="utf-8")
PYTHON_BLOCKS = [(code, line, skip) for lang, code, line, skip in code_blocks(TEXT) if lang == "python"]


def hub_python_blocks():
    """The python blocks outside the `<!-- source-repo-only:start/end -->` sections (those are about the package's own
    tools, for readers of a checkout; the rest is what a Hub user of the root folder follows)."""
    spans = [(m.start(), m.end()) for m in
             re.finditer(r"<!-- source-repo-only:start -->.*?<!-- source-repo-only:end -->", TEXT, re.S)]
    offsets = [sum(len(row) + 1 for row in TEXT.split("\n")[: line - 1]) for _, line, _ in PYTHON_BLOCKS]
    return [block for block, at in zip(PYTHON_BLOCKS, offsets) if not any(a <= at < b for a, b in spans)]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("readme")
    config_cls = utils.config_class()
    config = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    state = utils.import_package().Siglip2NavitModel(config).state_dict()
    ovis = utils.atomic_write_folder(base / "ovis-like", lambda tmp: utils.save_model_folder(tmp, state, config))

    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    naflex_config = Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_patches=256
    )
    Siglip2VisionModel(naflex_config).save_pretrained(base / "naflex-src")
    naflex = convert_siglip2_naflex.convert(base / "naflex-src", base / "naflex", hidden_stride=1)
    folders = {"path/or/hub-id": str(ovis), "path/to/siglip2-navit-naflex": str(naflex)}
    for placeholder, module in FAMILY_FOLDERS.items():  # each family's test module builds its tiny converted folder
        folders[placeholder] = importlib.import_module(module).readme_folder(base)
    return folders


def test_readme_has_python_examples():
    assert len(PYTHON_BLOCKS) >= 5
    assert sum(skip is None for _, _, skip in PYTHON_BLOCKS) >= 5


@pytest.mark.parametrize("code, line, skip", PYTHON_BLOCKS, ids=[f"line{line}" for _, line, _ in PYTHON_BLOCKS])
def test_python_block_runs(code, line, skip, tiny_models, monkeypatch):
    if skip is not None:
        assert re.search(r"\b(GPU|network)\b|^needs Ray, run by tests/\w+\.py", skip), \
            f"README.md:{line}: blocks may be skipped only for GPU/network, or for Ray when a Ray test runs them"
        pytest.skip(f"README.md:{line}: {skip}")
    for placeholder, folder in tiny_models.items():
        code = code.replace(f'"{placeholder}"', repr(folder))
    assert '"path/' not in code, f"README.md:{line}: unknown placeholder"
    monkeypatch.chdir(tiny_models["path/or/hub-id"])  # in a converted (Hub) folder: its examples/, no scripts/
    monkeypatch.setattr(sys, "path", list(sys.path))  # blocks may extend sys.path
    namespace = {"__name__": "__readme__"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    printed = stdout.getvalue().splitlines()
    for claim, output in zip(printed_claims(code), printed):
        if claim is not None:
            assert claim.startswith(output), f"README.md:{line}: prints {output!r}, its comment says {claim!r}"


# A `print(...)` comment that starts like a value (a list, tuple, torch.Size, TokenCount, number or bool) states
# what the line prints for the folder the block runs on; the rest of the comment may explain it.
VALUE_COMMENT = re.compile(r"^print\(.*\)\s+# ((?:[\[(\d]|torch\.Size\(|TokenCount\(|True|False).*)$")


def printed_claims(code: str) -> list:
    """For each top-level `print` line of `code`, in order: the value its comment claims, or None."""
    claims = []
    for text in code.splitlines():
        if text.startswith("print("):
            match = VALUE_COMMENT.match(text)
            claims.append(match.group(1) if match else None)
    return claims


def test_front_matter():
    assert TEXT.startswith("---\n")
    header = TEXT.split("\n---\n", 1)[0]
    fields = dict(re.findall(r"^(\w+):\s*(.*)$", header, re.M))
    assert fields["library_name"] == "transformers"
    assert fields["pipeline_tag"] == "image-feature-extraction"
    assert fields["license"] == "apache-2.0"
    tags = re.findall(r"^  - (\S+)$", header, re.M)
    assert {"siglip2", "navit"} <= set(tags)


@pytest.mark.parametrize("marker", sorted(CI_COMMANDS))
def test_ci_commands_are_intact(marker):
    """.ci/run extracts the bash line right after each marker; keep it exactly as CI expects."""
    after = TEXT.split(marker + "\n", 1)[1]
    assert after.startswith("```bash\n" + CI_COMMANDS[marker] + "\n```\n")


def test_python_blocks_need_no_package_install():
    """Hub users load the remote code with trust_remote_code; they have no `siglip2_navit` package to import (the
    source-repo-only sections are about the package's own tools)."""
    blocks = hub_python_blocks()
    assert 0 < len(blocks) < len(PYTHON_BLOCKS)
    for code, line, _ in blocks:
        assert not re.search(r"^\s*(from|import)\s+siglip2_navit\b", code, re.M), f"README.md:{line}"


def test_relative_links_resolve(tiny_models):
    """In this checkout, and in the card of a converted folder (what the Hub shows)."""
    card_folder = Path(tiny_models["path/or/hub-id"])
    card = (card_folder / "README.md").read_text(encoding="utf-8")
    for folder, text in ((ROOT, TEXT), (card_folder, card)):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            assert (folder / target).exists(), f"{folder}/README.md links to missing {target}"


def test_anchor_links_resolve():
    slugs = {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.*)$", TEXT, re.M)
    }
    for anchor in re.findall(r"\]\(#([^)]+)\)", TEXT):
        assert anchor in slugs, f"README.md links to missing section #{anchor}"


def test_reliability_counts_are_the_collected_tests():
    """The reliability section's "N (`tests/...py`)" figures are the number of test cases pytest collects there."""
    import subprocess

    section = TEXT.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    claims = re.findall(r"\| (\d+) \(`(tests/\w+\.py)`\)", section)
    assert len(claims) >= 3
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *{p for _, p in claims}],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    for count, path in claims:
        assert int(count) == sum(row.startswith(f"{path}::") for row in listed), path
