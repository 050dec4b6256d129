"""scripts/gpu_check.sh (the GPU acceptance check, run on a GPU machine) is checked here without a GPU: its bash
parses, its embedded Python compiles, and its dry run lists every step and writes the summary skeleton under $OUT
without installing or running anything."""

import re
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT


SCRIPT = REPO_ROOT / "scripts" / "gpu_check.sh"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@needs_bash
def test_gpu_check_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_embedded_python_compiles():
    blocks = re.findall(r"<<'PY'\n(.*?)\nPY\n", SCRIPT.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1
    compile(blocks[0], "gpu_check.sh:backend_equality", "exec")


@needs_bash
def test_gpu_check_dry_run_lists_every_step_and_writes_only_under_out(tmp_path):
    out = tmp_path / "report"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "GPU_CHECK_VENV": str(tmp_path / "venv")}
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    summary = (out / "gpu_check.md").read_text(encoding="utf-8")
    for step in ("nvidia-smi", "torch + .[dev]", "flash-attn", "pytest -m gpu", "flash varlen vs sdpa vs eager",
                 "navit-benchmark --device cuda"):
        assert step in summary and step in result.stdout, step
    assert summary.count("| dry run: ") == 6
    assert "--out " + str(out / "benchmark") in summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "gpu_check.md"]
    assert not (tmp_path / "venv").exists()  # nothing installed


@needs_bash
def test_gpu_check_refuses_unknown_arguments(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--fast"], env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr
