"""A plain (not editable) install: the console commands work from any directory, with no checkout beside them.

The package is installed into a temporary target; every command then runs from a folder outside the checkout with
only that target on PYTHONPATH: each `--help`, one real `navit-convert` (a tiny transformers SigLIP2 naflex
checkpoint saved here) and one real `navit-encode` with the converted folder.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("navit-encode", "navit-convert", "navit-push", "navit-benchmark", "navit-visualize")


def _setuptools_is_recent() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(target folder, environment that sees only it as `siglip2_navit`, a working folder outside the checkout)."""
    target = tmp_path_factory.mktemp("site")
    isolation = [] if _setuptools_is_recent() else ["--use-pep517"]  # else pip builds with its own setuptools
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *isolation, str(ROOT)]
    if not isolation:
        cmd.insert(cmd.index("--target"), "--no-build-isolation")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    work = tmp_path_factory.mktemp("elsewhere")
    return target, env, work


def _run(installed, command: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    target, env, work = installed
    script = target / "bin" / command
    return subprocess.run([sys.executable, str(script), *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_install_is_the_package_not_the_checkout(installed):
    target, env, work = installed
    done = subprocess.run([sys.executable, "-c", "import siglip2_navit.tools as t; print(t.__file__)"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).is_relative_to(target)
    assert not (target / "siglip2_navit" / "scripts").exists() and not (target / "siglip2_navit" / "tests").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_console_command_answers_help(installed, command):
    done = _run(installed, command, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and command in done.stdout


def test_convert_help_lists_the_families(installed):
    done = _run(installed, "navit-convert", "--help")
    for family in ("ovis", "siglip2-naflex", "aimv2", "dinov3"):
        assert family in done.stdout
    assert _run(installed, "navit-convert", "aimv2", "--help").stdout.startswith("usage: navit-convert aimv2")


def test_convert_then_encode_from_outside_the_checkout(installed):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    target, env, work = installed
    source = work / "naflex-src"
    torch.manual_seed(0)
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 patch_size=4, num_patches=16)
    Siglip2VisionModel(config).save_pretrained(source)

    converted = work / "converted"
    done = _run(installed, "navit-convert", "siglip2-naflex", str(source), str(converted))
    assert done.returncode == 0, done.stderr[-3000:]
    package = target / "siglip2_navit"
    for name in json.loads((converted / "config.json").read_text())["auto_map"].values():
        module = name.split(".")[0] + ".py"
        assert (converted / module).read_bytes() == (package / module).read_bytes()  # the installed package's code

    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 72), (64, 48)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    out = work / "features"
    done = _run(installed, "navit-encode", str(images), "--model", str(converted), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors import safe_open

    shards = sorted(out.glob("*.safetensors"))
    assert shards, done.stdout
    keys = set()
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            keys |= set(f.keys())
    assert any("img0.png" in k for k in keys) and any("img1.png" in k for k in keys), keys
