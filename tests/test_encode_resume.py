"""scripts/encode.py killed at every kind of moment, then rerun: every image exactly once, features equal to each
image encoded on its own, errors recorded once, no temporary files. Also 2 processes under torchrun (CPU, gloo),
killed and resumed by a single process."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from encode_testutils import (
    BUDGET_ARGS,
    SCRIPT,
    Reference,
    assert_matches_reference,
    env,
    make_bad_files,
    make_images,
    readme_loader,
    run_script,
    save_checkpoint,
)


KILL_ENV = "SIGLIP2_NAVIT_ENCODE_KILL_AT"
SIGKILLED = -9


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 images and 3 bad files whose ids sort among them (img004_bad.png comes right after img004.jpg)."""
    base = tmp_path_factory.mktemp("resume")
    images = base / "images"
    names = make_images(images, 24)
    bad_dir = base / "bad"
    bad = make_bad_files(bad_dir, images / "img000.jpg")
    bad_ids = []
    for source, after in zip(bad, ("img004", "img011", "img019")):
        target = f"{after}_bad{Path(source).suffix}"
        (bad_dir / source).rename(images / target)
        bad_ids.append(target)
    return {"images": images, "good": {n: images / n for n in names}, "bad": sorted(bad_ids),
            "model": save_checkpoint(base / "tiny")}


def _args(data, out, *extra):
    return [data["images"], "--out", out, "--model", data["model"], *BUDGET_ARGS, "--shard-size", "3",
            "--max-tokens", "100", *extra]


def _shards(out):
    return sorted(p for p in Path(out).iterdir() if p.name.startswith("train-r"))


def _check_complete(data, out):
    """Every good id exactly once over all shards, equal to the reference; each bad id once in errors.jsonl."""
    from safetensors import safe_open

    ids = []
    for shard in _shards(out):
        with safe_open(str(shard), "pt") as f:
            ids += json.loads(f.metadata()["ids"])
    assert sorted(ids) == sorted(data["good"])  # exactly once
    assert_matches_reference(readme_loader()(str(out)), data["good"], Reference(data["model"]))
    text = (Path(out) / "errors.jsonl").read_text()
    assert text.endswith("\n")
    assert sorted(json.loads(line)["id"] for line in text.splitlines()) == data["bad"]
    assert not [p.name for p in Path(out).iterdir() if p.name.startswith(".tmp")]


def _kill_randomly(data, out, seed):
    """Start a run, wait until it has written a shard, then SIGKILL it at a random moment."""
    before = len(_shards(out))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, _args(data, out))], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and len(_shards(out)) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0, 0.05))
    proc.kill()
    proc.wait()


def test_killed_at_every_point_then_resumed_equals_an_uninterrupted_run(data, tmp_path):
    out = tmp_path / "out"

    result = run_script(_args(data, out), **{KILL_ENV: "mid_error:1"})
    assert result.returncode == SIGKILLED, result.stderr
    assert len(_shards(out)) == 1  # the chunk before the first bad file
    assert not (out / "errors.jsonl").read_bytes().endswith(b"\n")  # torn line

    result = run_script(_args(data, out), **{KILL_ENV: "after_shard:1"})
    assert result.returncode == SIGKILLED, result.stderr
    assert len(_shards(out)) == 2
    assert (out / "errors.jsonl").read_text().count("\n") == 1  # torn line dropped, that input recorded again

    result = run_script(_args(data, out), **{KILL_ENV: "before_rename:1"})
    assert result.returncode == SIGKILLED, result.stderr
    assert len(_shards(out)) == 2 and [p for p in out.iterdir() if p.name.startswith(".tmp-")]

    result = run_script(_args(data, out, "--workers", "2"), **{KILL_ENV: "after_batch:2"})
    assert result.returncode == SIGKILLED, result.stderr

    _kill_randomly(data, out, seed=0)

    result = run_script(_args(data, out))
    assert result.returncode == 0, result.stderr
    assert "errors in this run" in result.stdout
    _check_complete(data, out)


@pytest.mark.slow
def test_two_processes_under_torchrun_then_killed_and_resumed_by_one(data, tmp_path):
    def torchrun(out, **extra_env):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               *map(str, _args(data, out))]
        return subprocess.run(cmd, capture_output=True, text=True, env=env(**extra_env), timeout=400)

    out = tmp_path / "two"
    result = torchrun(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "processes=2" in result.stdout and "encoded 24 images" in result.stdout
    assert {p.name.split("-")[1] for p in _shards(out)} == {"r00000", "r00001"}
    _check_complete(data, out)

    out = tmp_path / "killed"
    result = torchrun(out, **{KILL_ENV: "after_shard:1"})
    assert result.returncode != 0
    assert 1 <= len(_shards(out)) <= 2
    result = run_script(_args(data, out))
    assert result.returncode == 0, result.stderr
    _check_complete(data, out)
