"""navit-encode --engine ray (Ray Data): the same output as the local engine (ids, features within 1e-4, errors),
either engine resuming the other's folder, a SIGKILLed encoder actor (each id still stored exactly once), a cluster
reached through RAY_ADDRESS, and the README's NavitBatchEncoder snippet. One local Ray cluster serves the module."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

ray = pytest.importorskip("ray")

from encode_testutils import (  # noqa: E402
    BUDGET_ARGS,
    ROOT,
    Reference,
    assert_matches_reference,
    env,
    load_encode_module,
    make_bad_files,
    make_images,
    make_shard,
    readme_loader,
    save_checkpoint,
)


encode = load_encode_module()
from siglip2_navit.navit_core import preferred_dtype  # noqa: E402
KILL_ENV, KILL_ONCE_ENV = "SIGLIP2_NAVIT_ENCODE_KILL_AT", "SIGLIP2_NAVIT_ENCODE_KILL_ONCE"


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """10 images and 3 bad files in a folder, plus a shard of 3 samples (one corrupt)."""
    base = tmp_path_factory.mktemp("ray")
    images = base / "images"
    names = make_images(images, 10)
    bad = make_bad_files(images, images / "img000.jpg")
    good = {n: images / n for n in names}
    extra = make_images(base / "extra", 2, seed=5, prefix="s")
    make_shard(images / "shard-00000.tar", [("s0.jpg", (base / "extra" / extra[0]).read_bytes()),
                                            ("s1.png", (base / "extra" / extra[1]).read_bytes()),
                                            ("s2.jpg", b"corrupt")])
    good.update({"shard-00000/s0": base / "extra" / extra[0], "shard-00000/s1": base / "extra" / extra[1]})
    return {"images": images, "good": good, "bad": sorted(bad + ["shard-00000/s2"]),
            "model": save_checkpoint(base / "tiny")}


def _run(data, out, *extra):
    return encode.main([str(data["images"]), "--out", str(out), "--model", str(data["model"]), *BUDGET_ARGS,
                        "--shard-size", "4", "--max-tokens", "100", *extra])


def _shards(out):
    return sorted(Path(out).glob("train-r*.safetensors"))


def _check_complete(data, out):
    """Every good id exactly once over the shards, equal to the reference; each bad id once in errors.jsonl."""
    from safetensors import safe_open

    ids = []
    for shard in _shards(out):
        with safe_open(str(shard), "pt") as f:
            ids += json.loads(f.metadata()["ids"])
    assert sorted(ids) == sorted(data["good"])
    features = readme_loader()(str(out))
    assert_matches_reference(features, data["good"], Reference(data["model"]))
    lines = (Path(out) / "errors.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == data["bad"]
    return features


def test_ray_equals_local_and_each_engine_resumes_the_other(data, tmp_path, capsys):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert _run(data, local) == 0, capsys.readouterr().err
    assert _run(data, on_ray, "--engine", "ray", "--ray-actors", "1") == 0, capsys.readouterr().err
    expected, got = _check_complete(data, local), _check_complete(data, on_ray)
    assert sorted(got) == sorted(expected)
    assert max(float((got[k] - expected[k]).abs().max()) for k in got) <= 1e-4
    assert json.loads((local / "_manifest.json").read_text()) == json.loads((on_ray / "_manifest.json").read_text())

    removed = _shards(on_ray)[1]
    removed.unlink()
    capsys.readouterr()
    assert _run(data, on_ray) == 0  # the local engine resumes the ray engine's folder
    assert "encoded 4 images, skipped 12 already done" in capsys.readouterr().out  # 8 stored, 4 errors
    _check_complete(data, on_ray)

    _shards(local)[0].unlink()
    assert _run(data, local, "--engine", "ray", "--ray-actors", "1") == 0  # and the other way round
    assert "encoded 4 images, skipped 12 already done" in capsys.readouterr().out  # 8 stored, 4 errors
    _check_complete(data, local)


def test_killed_encoder_actor_is_restarted_and_every_id_stored_once(data, tmp_path, monkeypatch, capsys):
    from siglip2_navit.tools import encode_ray

    marker = tmp_path / "killed"
    monkeypatch.setattr(encode_ray, "ACTOR_BATCH_ROWS", 3)  # several actor calls: the kill comes mid-run
    monkeypatch.setenv(KILL_ENV, "actor_batch:2")
    monkeypatch.setenv(KILL_ONCE_ENV, str(marker))
    out = tmp_path / "out"
    assert _run(data, out, "--engine", "ray", "--ray-actors", "1") == 0, capsys.readouterr().err
    assert marker.exists()  # the actor did SIGKILL itself at its second batch
    _check_complete(data, out)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_joins_the_cluster_at_ray_address(data, tmp_path):
    port = _free_port()
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port), "--node-ip-address",
                             "127.0.0.1", "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out = tmp_path / "out"
        result = subprocess.run([sys.executable, "-m", "siglip2_navit.tools.encode", str(data["images"]), "--out",
                                 str(out), "--model", str(data["model"]), *BUDGET_ARGS, "--shard-size", "4",
                                 "--engine", "ray", "--ray-actors", "1"], capture_output=True, text=True,
                                env=env(RAY_ADDRESS=f"127.0.0.1:{port}"), timeout=240)
        assert result.returncode == 0, result.stderr
        assert f"ray: on the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}: 2 CPUs" in result.stderr
        _check_complete(data, out)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started; then its whole group goes
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1)
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start` names its head there; `ray stop` would remove it
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_readme_navit_batch_encoder_snippet_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "NavitBatchEncoder" in b)
    model = save_checkpoint(tmp_path / "head", use_head=True, seed=4)
    code, count = re.subn(r'^model = .*$', f"model = {str(model)!r}", code, flags=re.M)
    assert count == 1
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(compile(code, "README.md:NavitBatchEncoder", "exec"), namespace)  # noqa: S102 - our own documentation
    paths = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").iterdir() if p.suffix in (".jpg", ".png"))
    assert sorted(namespace["embeddings"]) == paths
    reference = Reference(model, budget={})  # fp32
    bf16 = preferred_dtype("cpu") == torch.bfloat16  # the snippet's dtype: navit-encode's default, auto
    for path in paths:
        got, expected = torch.as_tensor(namespace["embeddings"][path]), reference(ROOT / path)[1]
        if bf16:  # bf16 rounding: the direction is kept
            assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > 0.999, path
        else:
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=path)
