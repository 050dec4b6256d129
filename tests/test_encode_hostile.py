"""The encode job (and the converters' disk-full path) against hostile inputs and environments: non-finite features,
file names that are not UTF-8, FIFOs and symlink loops, DataLoader workers orphaned by a SIGKILL, corrupt shards,
a full disk, a killed worker, errors.jsonl that is a folder, weights that disagree with the config.

Every case runs the real command line as a subprocess (`scripts/encode.py`, `scripts/convert_siglip2_naflex.py`):
exit status, one-line messages, no traceback, and what is on disk afterwards. Faults are injected with a few lines of
Python run before the script (`_run_patched`): they patch the operating-system call (`os.fsync`, `os.write`) or the
safetensors serializer, never the code under test."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from encode_testutils import (
    BUDGET_ARGS,
    ROOT,
    SCRIPT,
    TINY,
    Reference,
    env,
    make_images,
    run_script,
    save_checkpoint,
)


KILL_ENV = "SIGLIP2_NAVIT_ENCODE_KILL_AT"
TINY_ARG = ",".join(f"{k}={v}" for k, v in TINY.items())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    images = base / "images"
    names = make_images(images, 6)
    return {"base": base, "images": images, "good": {n: images / n for n in names},
            "model": save_checkpoint(base / "tiny")}


@pytest.fixture(scope="module")
def reference(data):
    return Reference(data["model"])


def _args(data, *inputs, out=None, model=None) -> List[str]:
    return [*map(str, inputs), *([] if out is None else ["--out", str(out)]),
            "--model", str(model or data["model"]), *BUDGET_ARGS]


def _run_patched(prelude: str, script: Path, args: List[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """`script args` as `python -c`, after running `prelude` in the same process (the fault injection)."""
    code = (f"{prelude}\nimport runpy, sys\nsys.argv = {[str(script), *map(str, args)]!r}\n"
            f"sys.path.insert(0, {str(script.parent)!r})\nrunpy.run_path({str(script)!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=str(ROOT),
                          timeout=timeout)


def _one_line_error(result: subprocess.CompletedProcess, status: int, *fragments: str) -> str:
    """The run failed with `status` and said why in one stderr line holding every fragment; no traceback."""
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _features(out: Path) -> Dict[str, torch.Tensor]:
    """{id: features} of every shard in `out`, either format (ids checked unique)."""
    from safetensors import safe_open

    features: Dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("train-r*")):
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                loaded = {i: f.get_tensor(i) for i in json.loads(f.metadata()["ids"])}
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(str(path)).to_pylist()
            loaded = {r["id"]: torch.tensor(r["embedding"]).reshape(r["shape"]) for r in table}
        assert not set(loaded) & set(features)
        features.update(loaded)
    return features


def _errors(out: Path) -> Dict[str, str]:
    path = out / "errors.jsonl"
    if not path.exists():
        return {}
    return {r["id"]: r["error"] for r in map(json.loads, path.read_bytes().decode("utf-8").splitlines())}


def _assert_complete(out: Path, paths: Dict[str, Path], reference: Reference) -> None:
    features = _features(out)
    assert sorted(features) == sorted(paths)
    for item_id, path in paths.items():
        torch.testing.assert_close(features[item_id].float(), reference(path)[0], atol=1e-4, rtol=1e-4, msg=item_id)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]


# ----------------------------------------------------------------------------------------------------------------------
# non-finite features
# ----------------------------------------------------------------------------------------------------------------------


# Set on the model after it is built, past every config check: rope_theta = -1 makes NaN for most images but not all,
# a LayerNorm eps of -1e6 NaN for every row.
BROKEN_MODEL = """
import torch, transformers
_from_config = transformers.AutoModel.from_config
def _broken(config, **kwargs):
    model = _from_config(config, **kwargs)
    model.config.rope_theta = -1.0 if {what!r} == "rope_theta" else model.config.rope_theta
    for module in model.modules():
        if {what!r} == "layer_norm_eps" and isinstance(module, torch.nn.LayerNorm):
            module.eps = -1e6
    return model
transformers.AutoModel.from_config = staticmethod(_broken)
"""


def test_nan_features_are_errors_never_stored(data, tmp_path):
    """NaN for most images but not all: those are recorded in errors.jsonl, the finite ones stored; a rerun does not
    retry them."""
    out = tmp_path / "nan"
    args = [data["images"], "--out", out, "--model", ROOT, *BUDGET_ARGS, "--config-overrides", TINY_ARG]
    result = _run_patched(BROKEN_MODEL.format(what="rope_theta"), SCRIPT, args)
    assert result.returncode == 0, result.stderr
    features, errors = _features(out), _errors(out)
    assert errors, "rope_theta=-1 gives NaN for most images: some must be recorded"
    assert sorted([*features, *errors]) == sorted(data["good"])
    assert all(torch.isfinite(f).all() for f in features.values())
    assert all("non-finite" in message for message in errors.values())
    assert f"{len(errors)} errors in this run" in result.stdout
    again = _run_patched(BROKEN_MODEL.format(what="rope_theta"), SCRIPT, args)
    assert again.returncode == 0 and "skipped 6 already done" in again.stdout, again.stderr


def test_a_model_that_gives_only_nan_stops_with_one_line(data, tmp_path):
    """Every row NaN: the job stops at the first batch naming the cause; nothing is stored or recorded against the
    images. A config value refused at load (rope_theta = -1 through --config-overrides) is one line too."""
    out = tmp_path / "allnan"
    args = [data["images"], "--out", out, "--model", ROOT, *BUDGET_ARGS, "--config-overrides", TINY_ARG]
    _one_line_error(_run_patched(BROKEN_MODEL.format(what="layer_norm_eps"), SCRIPT, args), 1, "NaN")
    assert not list(out.glob("train-r*")) and not _errors(out)
    refused = run_script([*args[:-1], f"{TINY_ARG},rope_theta=-1"])
    _one_line_error(refused, 2, "rope_theta")


# ----------------------------------------------------------------------------------------------------------------------
# odd file names and file types
# ----------------------------------------------------------------------------------------------------------------------


def _non_utf8_name(folder: Path, name: bytes, content: bytes) -> None:
    try:
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(content)
    except OSError:  # e.g. macOS: file names must be UTF-8
        pytest.skip("this filesystem refuses file names that are not UTF-8")


def test_file_names_that_are_not_utf8_get_escaped_ids(data, reference, tmp_path):
    """A Latin-1 name is encoded under an id that writes its undecodable byte as \\xNN; a non-image with such a name
    is recorded in errors.jsonl (valid UTF-8 JSON); the rest is encoded; the rerun resumes."""
    folder = tmp_path / "names"
    folder.mkdir()
    for name, path in data["good"].items():
        (folder / name).write_bytes(path.read_bytes())
    _non_utf8_name(folder, b"caf\xe9.png", data["good"]["img001.png"].read_bytes())
    _non_utf8_name(folder, b"bad\xff.jpg", b"not an image")
    out = tmp_path / "out"
    result = run_script(_args(data, folder, out=out))
    assert result.returncode == 0, result.stderr
    expected = {**{n: folder / n for n in data["good"]}, "caf\\xe9.png": data["good"]["img001.png"]}
    _assert_complete(out, expected, reference)
    errors = _errors(out)
    assert list(errors) == ["bad\\xff.jpg"]
    again = run_script(_args(data, folder, out=out))
    assert again.returncode == 0 and "encoded 0 images, skipped 8 already done" in again.stdout, again.stderr
    demo = run_script(_args(data, folder))  # the table names it too (stdout is strict UTF-8)
    assert demo.returncode == 0 and "caf\\xe9.png" in demo.stdout, demo.stderr


def test_fifos_are_recorded_unopened_and_globs_do_not_follow_symlink_loops(data, tmp_path):
    """A FIFO in a folder, and one given directly, would block the job forever if opened; two symlinks to a parent
    under a `**` glob would make it walk 2^40 paths. Both runs are bounded by a timeout."""
    folder = tmp_path / "tree"
    (folder / "sub").mkdir(parents=True)
    for name in ("img000.jpg", "img001.png"):
        (folder / name).write_bytes(data["good"][name].read_bytes())
    (folder / "sub" / "img002.jpg").write_bytes(data["good"]["img002.jpg"].read_bytes())
    os.mkfifo(folder / "pipe.jpg")
    os.symlink("..", folder / "sub" / "up1")
    os.symlink("..", folder / "sub" / "up2")

    out = tmp_path / "out"
    result = run_script(_args(data, folder, folder / "pipe.jpg", out=out), timeout=90)
    assert result.returncode == 0, result.stderr
    assert sorted(_features(out)) == ["img000.jpg", "img001.png", "sub/img002.jpg"]
    errors = _errors(out)
    assert sorted(errors) == sorted(["pipe.jpg", str(folder / "pipe.jpg")])
    assert all("not a regular file" in message for message in errors.values())

    result = run_script(_args(data, f"{folder}/**/*.jpg"), timeout=90)
    assert result.returncode == 0, result.stderr
    assert "images: 2 " in result.stdout  # img000.jpg and sub/img002.jpg, once each (the FIFO is an error)
    assert f"error: {folder}/pipe.jpg: " in result.stderr and "up1" not in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# processes: orphaned workers, a killed worker
# ----------------------------------------------------------------------------------------------------------------------


def _children(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the DataLoader workers")
def test_orphaned_workers_of_a_killed_job_do_not_hold_the_lock(data, reference, tmp_path):
    """The job SIGKILLs itself after its first batch with --workers 2; its workers live on for a while (stopped
    here, so that they surely do). An immediate rerun must not be refused by a lock they inherited."""
    out = tmp_path / "out"
    args = _args(data, data["images"], out=out) + ["--workers", "2", "--shard-size", "2", "--max-tokens", "64"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env(**{KILL_ENV: "after_batch:1"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set = set()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        workers.update(_children(proc.pid))
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL
    try:
        alive = []
        for pid in workers:
            try:
                os.kill(pid, signal.SIGSTOP)
                alive.append(pid)
            except ProcessLookupError:
                pass
        assert alive, "the workers exited before they could be stopped"
        result = run_script(args)
        assert result.returncode == 0, result.stderr
        _assert_complete(out, data["good"], reference)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


WORKER_DIES = """
import os, signal, PIL.Image
_main, _open = os.getpid(), PIL.Image.open
def _open_or_die(fp, *args, **kwargs):
    if os.getpid() != _main and str(fp).endswith("img003.png"):  # a DataLoader worker (forked) opening that image
        os.kill(os.getpid(), signal.SIGKILL)
    return _open(fp, *args, **kwargs)
PIL.Image.open = _open_or_die
"""


def test_a_killed_worker_is_one_line_and_the_rerun_resumes(data, reference, tmp_path):
    """A DataLoader worker SIGKILLed (as the OOM killer does) while it decodes an image."""
    out = tmp_path / "out"
    args = _args(data, data["images"], out=out) + ["--workers", "2", "--shard-size", "2", "--max-tokens", "64"]
    _one_line_error(_run_patched(WORKER_DIES, SCRIPT, args), 1, "worker", "rerun")
    result = run_script(args)
    assert result.returncode == 0, result.stderr
    _assert_complete(out, data["good"], reference)


# ----------------------------------------------------------------------------------------------------------------------
# the output folder: corrupt shards, disk full, errors.jsonl as a folder
# ----------------------------------------------------------------------------------------------------------------------


def _flip_data_bytes(path: Path) -> None:
    """Flip 8 bytes in the middle of the tensor data (safetensors: after the header; parquet: mid-file, inside the
    embedding column, which is most of the file)."""
    blob = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(blob[:8], "little") if path.suffix == ".safetensors" else 0
    middle = (start + len(blob)) // 2
    for i in range(middle, middle + 8):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("fmt", ["safetensors", "parquet"])
def test_a_corrupt_shard_is_found_on_resume_and_encoded_again(fmt, data, reference, tmp_path):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / "out"
    args = _args(data, data["images"], out=out) + ["--shard-size", "2", "--format", fmt]
    assert run_script(args).returncode == 0
    shard = sorted(out.glob("train-r*"))[1]
    _flip_data_bytes(shard)
    result = run_script(args)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if shard.name in line]
    assert len(notes) == 1 and "corrupt" in notes[0], result.stderr
    assert "encoded 2 images, skipped 4 already done" in result.stdout
    _assert_complete(out, data["good"], reference)
    assert "skipped 6 already done" in run_script(args).stdout  # the new shard verifies


FSYNC_ENOSPC = """
import errno, os, re
_fsync, _seen = os.fsync, []
def _full(fd):
    if re.search(r"{pattern}", os.readlink(f"/proc/self/fd/{{fd}}")):
        _seen.append(fd)
        if len(_seen) >= {nth}:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _fsync(fd)
os.fsync = _full
"""

WRITE_ENOSPC = """
import errno, os
_write = os.write
def _full(fd, data):
    if os.readlink(f"/proc/self/fd/{fd}").endswith("errors.jsonl"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _write(fd, data)
os.write = _full
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the fault injection names files through /proc")
@pytest.mark.parametrize("where", ["second shard", "errors.jsonl"])
def test_disk_full_is_one_line_and_the_rerun_resumes(where, data, reference, tmp_path):
    """ENOSPC while the second shard is made durable, or while an error is recorded: one line, exit status 1, no
    temporary file left; the same command with space again completes the folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, path in data["good"].items():
        (folder / name).write_bytes(path.read_bytes())
    (folder / "img002_bad.png").write_text("not an image")  # sorts among the images: recorded mid-run
    out = tmp_path / "out"
    args = _args(data, folder, out=out) + ["--shard-size", "2"]
    prelude = FSYNC_ENOSPC.format(pattern=r"/\.tmp-.*train-r", nth=2) if where == "second shard" else WRITE_ENOSPC
    _one_line_error(_run_patched(prelude, SCRIPT, args), 1, "No space left on device")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
    assert run_script(args).returncode == 0
    _assert_complete(out, {n: folder / n for n in data["good"]}, reference)
    assert list(_errors(out)) == ["img002_bad.png"]


def test_errors_jsonl_that_is_a_folder_is_one_line(data, tmp_path):
    """Left by a mistake or another tool in a folder this job wrote before."""
    out = tmp_path / "out"
    assert run_script(_args(data, data["good"]["img000.jpg"], out=out)).returncode == 0
    (out / "errors.jsonl").mkdir()
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    _one_line_error(run_script(_args(data, data["good"]["img000.jpg"], bad, out=out)), 2, "errors.jsonl")


def test_converter_disk_full_is_one_line(tmp_path):
    """The real failure, seen on a full tmpfs: safetensors raises its own SafetensorError, not an OSError."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    src, dst = tmp_path / "src", tmp_path / "dst"
    torch.manual_seed(0)
    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, patch_size=16, num_patches=16)).save_pretrained(src)
    prelude = ("import safetensors, safetensors.torch\n"
               "def _full(*args, **kwargs):\n"
               "    raise safetensors.SafetensorError("
               "'Error while serializing: I/O error: No space left on device (os error 28)')\n"
               "safetensors.torch.serialize_file = _full\n")
    result = _run_patched(prelude, ROOT / "scripts" / "convert_siglip2_naflex.py", [src, dst])
    _one_line_error(result, 1, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temporary folder beside it


# ----------------------------------------------------------------------------------------------------------------------
# weights that disagree with the config
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, kind", [(3, "missing"), (1, "unexpected")])
def test_weights_that_disagree_with_the_config_are_refused(layers, kind, data, tmp_path):
    """The checkpoint has 2 layers; a config.json that says 3 would run a random third layer, 1 would drop one."""
    model = tmp_path / "model"
    model.mkdir()
    for path in data["model"].iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = run_script(_args(data, data["images"], out=out, model=model))
    line = _one_line_error(result, 2, kind)
    assert re.search(r"layers\.[12]\.", line) and result.stderr.strip() == line, result.stderr  # no load report
    assert not out.exists()


def test_glob_matches_equal_glob_where_there_is_no_link(tmp_path, monkeypatch):
    """The glob walk that does not follow folder links gives exactly what glob.glob(recursive=True) gives on a tree
    without links (hidden names, nested folders, a trailing `**`, relative and absolute patterns)."""
    import glob

    from encode_testutils import load_encode_module

    encode = load_encode_module()
    for name in ("a.png", "b.jpg", ".hidden.png", "sub/c.png", "sub/deeper/d.png", "sub/deeper/e.txt", ".dot/f.png",
                 "sib/g.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    patterns = ["*.png", "**/*.png", "**", "sub/**", "s?b/*.png", "*/", "sub/*/*.png", ".*", "**/.*", "[ab].*",
                "sub/deeper/*", "nope/**/*.png"]
    for pattern in patterns + [str(tmp_path / p) for p in patterns]:
        assert sorted(encode.glob_matches(pattern)) == sorted(glob.glob(pattern, recursive=True)), pattern
