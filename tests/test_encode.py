"""scripts/encode.py end to end (subprocesses, tiny configs) and processor + model end to end on real images."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "encode.py"
EXAMPLES = [str(ROOT / "examples" / n) for n in ("rocket.jpg", "camera.png", "chelsea.png", "coffee.png", "horse.png")]
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
TINY_ARG = ",".join(f"{k}={v}" for k, v in TINY.items())

# file -> (original WxH, resized WxH), the resized sizes worked out by hand from SPEC §8 (factor 32, default budget):
#   rocket 427x640 (HxW): round(13.34)=13 -> 416, 640 -> 640
#   camera 512x512: unchanged
#   chelsea 300x451: 288x448 < min -> beta = sqrt(200704/135300) = 1.21795 -> ceil(11.42)=12 -> 384, ceil(17.17)=18 -> 576
#   coffee 400x600: round(12.5) = 12 (half to even) -> 384, round(18.75) = 19 -> 608
#   horse 328x400: 320x384 < min -> beta = sqrt(200704/131200) = 1.23683 -> ceil(12.68)=13 -> 416, ceil(15.46)=16 -> 512
EXPECTED = {
    "rocket": ((640, 427), (640, 416)),
    "camera": ((512, 512), (512, 512)),
    "chelsea": ((451, 300), (576, 384)),
    "coffee": ((600, 400), (608, 384)),
    "horse": ((400, 328), (512, 416)),
}


def _env():
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(args, timeout=300):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=_env(), cwd=str(ROOT), timeout=timeout
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _table_rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S+)\s+(\d+)x(\d+)\s+(\d+)x(\d+)\s+\((\d+),(\d+),(\d+)\)\s+(\d+)\s+(\d+)\s*$", line)
        if m:
            v = [int(x) for x in m.groups()[1:]]
            rows[Path(m.group(1)).stem] = dict(orig=(v[0], v[1]), resized=(v[2], v[3]), grid=tuple(v[4:7]),
                                               patches=v[7], tokens=v[8])
    return rows


def _check_table(stdout):
    rows = _table_rows(stdout)
    assert set(rows) == set(EXPECTED)
    for name, (orig, resized) in EXPECTED.items():
        row = rows[name]
        assert row["orig"] == orig and row["resized"] == resized, name
        grid = (1, resized[1] // 16, resized[0] // 16)
        assert row["grid"] == grid
        assert row["patches"] == grid[1] * grid[2] and row["tokens"] == grid[1] * grid[2] // 4
    total_patches = sum(r["patches"] for r in rows.values())
    assert f"total patches: {total_patches}" in stdout
    assert f"total merged tokens: {total_patches // 4}" in stdout
    assert re.search(r"wall time: [\d.]+ s\s+throughput: [\d.]+ patches/s", stdout)
    return rows


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "features.safetensors"
    result = _run([*EXAMPLES, "--config-overrides", TINY_ARG, "--out", str(out)])
    return result, out


def test_encode_prints_table_and_saves_features(single_run):
    result, out = single_run
    assert "RANDOMLY INITIALISED" in result.stderr  # loud warning: the repo root holds no weights
    rows = _check_table(result.stdout)
    tensors = load_file(str(out))
    assert set(tensors) == set(EXPECTED) | {f"{n}.grid_thws" for n in EXPECTED}
    for name, row in rows.items():
        assert tuple(tensors[name].shape) == (row["patches"], TINY["hidden_size"])
        assert torch.isfinite(tensors[name]).all()
        assert tensors[f"{name}.grid_thws"].tolist() == [list(row["grid"])]
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["names"]) == [Path(p).stem for p in EXAMPLES]
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]  # atomic write left no temp file


def test_encode_small_token_budget_gives_same_features(single_run, tmp_path):
    _, reference = single_run
    out = tmp_path / "small_batches.safetensors"
    result = _run([*EXAMPLES, "--config-overrides", TINY_ARG, "--out", str(out), "--max-tokens", "1100"])
    _check_table(result.stdout)
    got, expected = load_file(str(out)), load_file(str(reference))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_encode_two_processes_torchrun(single_run, tmp_path):
    _, reference = single_run
    out = tmp_path / "dist.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *EXAMPLES, "--config-overrides", TINY_ARG, "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(ROOT), timeout=400)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "processes=2" in result.stdout
    _check_table(result.stdout)
    shard0, shard1 = tmp_path / "dist.rank0.safetensors", tmp_path / "dist.rank1.safetensors"
    assert shard0.is_file() and shard1.is_file()
    index = json.loads((tmp_path / "dist.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    expected = load_file(str(reference))
    assert set(weight_map) == set(expected)
    assert set(weight_map.values()) == {shard0.name, shard1.name}
    merged = {}
    for shard in (shard0, shard1):
        part = load_file(str(shard))
        assert all(weight_map[name] == shard.name for name in part)
        merged.update(part)
    assert set(merged) == set(expected)
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], atol=1e-4, rtol=1e-4)


def _tiny_model():
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(ROOT), trust_remote_code=True)
    for key, value in TINY.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    return AutoModel.from_config(config, trust_remote_code=True, attn_implementation="eager").eval()


def test_processor_and_model_end_to_end_on_two_real_images():
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(ROOT), trust_remote_code=True)
    model = _tiny_model()
    images = [PIL.Image.open(ROOT / "examples" / "rocket.jpg"), PIL.Image.open(ROOT / "examples" / "horse.png")]
    batch = proc(images=images, return_tensors="pt")
    assert batch["grid_thws"].tolist() == [[1, 26, 40], [1, 26, 32]]  # 416x640 and 416x512, see EXPECTED
    with torch.no_grad():
        packed = model(batch["pixel_values"], batch["grid_thws"]).last_hidden_state
        assert tuple(packed.shape) == (26 * 40 + 26 * 32, TINY["hidden_size"])
        singles = [model(**proc(images=im, return_tensors="pt")).last_hidden_state for im in images]
    torch.testing.assert_close(packed, torch.cat(singles), atol=1e-5, rtol=1e-5)


def test_encode_uses_weights_when_the_folder_has_them(tmp_path):
    from transformers import AutoImageProcessor

    folder = tmp_path / "tiny_checkpoint"
    model = _tiny_model()
    model.save_pretrained(str(folder))
    for name in ("image_processing_siglip2_navit.py", "preprocessor_config.json", "processor_config.json"):
        shutil.copy(ROOT / name, folder / name)
    assert (folder / "model.safetensors").is_file()

    out = tmp_path / "weights.safetensors"
    files = EXAMPLES[:2]
    result = _run([*files, "--model", str(folder), "--attn", "eager", "--out", str(out)])
    assert "RANDOMLY INITIALISED" not in result.stderr
    assert "pretrained weights" in result.stdout
    saved = load_file(str(out))
    proc = AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=True)
    with torch.no_grad():
        for path in files:
            expected = model(**proc(images=PIL.Image.open(path), return_tensors="pt")).last_hidden_state
            torch.testing.assert_close(saved[Path(path).stem], expected, atol=1e-4, rtol=1e-4)


def test_encode_rejects_bad_arguments(tmp_path):
    for args, message in (
        ([EXAMPLES[0], "--max-tokens", "0"], "--max-tokens must be positive"),
        ([str(tmp_path / "missing.png")], "no such file"),
        ([EXAMPLES[0], "--out", str(tmp_path / "x.npz")], "must end with .safetensors"),
    ):
        result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=_env(),
                                timeout=120)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)


def test_tensor_names_are_unique_even_when_an_index_suffix_meets_another_stem():
    import importlib.util

    spec = importlib.util.spec_from_file_location("siglip2_navit_encode_script", SCRIPT)
    encode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(encode)
    cases = {
        ("x/a.png", "y/a.jpg", "a_1.png"): None,  # "a" twice -> a_0, a_1; but a_1.png is also "a_1"
        ("a.png", "b.png", "c d.png"): ["a", "b", "c_d"],  # unique stems keep their (sanitised) names
        ("p/x.png", "q/x.png", "x_0.png", "x_1.png", "x_0_1.png"): None,
    }
    for files, expected in cases.items():
        names = encode.unique_names(list(files))
        assert len(set(names)) == len(files), names
        if expected is not None:
            assert names == expected
