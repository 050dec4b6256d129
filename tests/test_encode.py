"""scripts/encode.py: the demo table, features against an independent per-image reference, pooled features, both
output formats read back (README loader, pyarrow, datasets), datasets input, bad inputs, settings fingerprint,
CLI errors and input collection. Kill-and-resume and multi-process runs: tests/test_encode_resume.py."""

import importlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import PIL.Image
import pytest
import torch

from encode_testutils import (
    BUDGET,
    BUDGET_ARGS,
    ROOT,
    TINY,
    Reference,
    assert_matches_reference,
    load_encode_module,
    make_bad_files,
    make_images,
    readme_loader,
    run_script,
    save_checkpoint,
)


encode = load_encode_module()
EXAMPLES = [str(ROOT / "examples" / n) for n in ("rocket.jpg", "camera.png", "chelsea.png", "coffee.png", "horse.png")]
TINY_ARG = ",".join(f"{k}={v}" for k, v in TINY.items())

# file -> (original WxH, resized WxH), resized sizes worked out by hand by smart_resize (factor 32, default budget):
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


def _table_rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S+)\s+(\d+)x(\d+)\s+(\d+)x(\d+)\s+\((\d+),(\d+),(\d+)\)\s+(\d+)\s+(\d+)\s*$", line)
        if m:
            v = [int(x) for x in m.groups()[1:]]
            rows[Path(m.group(1)).stem] = dict(orig=(v[0], v[1]), resized=(v[2], v[3]), grid=tuple(v[4:7]),
                                               patches=v[7], tokens=v[8])
    return rows


def test_demo_prints_table_without_writing_anything():
    """The README's quick-start command: one row per image, totals and timing, loud random-weights warning."""
    result = run_script([*EXAMPLES, "--config-overrides", TINY_ARG])
    assert result.returncode == 0, result.stderr
    assert "RANDOMLY INITIALISED" in result.stderr
    rows = _table_rows(result.stdout)
    assert set(rows) == set(EXPECTED)
    for name, (orig, resized) in EXPECTED.items():
        row = rows[name]
        assert row["orig"] == orig and row["resized"] == resized, name
        grid = (1, resized[1] // 16, resized[0] // 16)
        assert row["grid"] == grid
        assert row["patches"] == grid[1] * grid[2] and row["tokens"] == grid[1] * grid[2] // 4
    total_patches = sum(r["patches"] for r in rows.values())
    assert f"images: 5  total patches: {total_patches}  total merged tokens: {total_patches // 4}" in result.stdout
    assert re.search(r"wall time: [\d.]+ s\s+throughput: [\d.]+ patches/s", result.stdout)
    assert re.search(r"encoding: 100%.*5/5.*[\d.]+ img/s, \d+ tok/s, errors 0", result.stderr)  # progress bar


def test_processor_and_model_end_to_end_on_two_real_images():
    """Two real photos packed in one call equal each encoded alone (the reference the encode tests rely on)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    config = AutoConfig.from_pretrained(str(ROOT), trust_remote_code=True)
    for key, value in TINY.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    model = AutoModel.from_config(config, trust_remote_code=True, attn_implementation="eager").eval()
    proc = AutoImageProcessor.from_pretrained(str(ROOT), trust_remote_code=True)
    images = [PIL.Image.open(ROOT / "examples" / "rocket.jpg"), PIL.Image.open(ROOT / "examples" / "horse.png")]
    batch = proc(images=images, return_tensors="pt")
    assert batch["grid_thws"].tolist() == [[1, 26, 40], [1, 26, 32]]  # 416x640 and 416x512, see EXPECTED
    with torch.no_grad():
        packed = model(batch["pixel_values"], batch["grid_thws"]).last_hidden_state
        assert tuple(packed.shape) == (26 * 40 + 26 * 32, TINY["hidden_size"])
        singles = [model(**proc(images=im, return_tensors="pt")).last_hidden_state for im in images]
    torch.testing.assert_close(packed, torch.cat(singles), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny checkpoint (with and without the MAP head), 10 generated images in two folders, 3 bad files."""
    base = tmp_path_factory.mktemp("encode")
    images = base / "images"
    names = make_images(images, 6) + [f"sub/{n}" for n in make_images(images / "sub", 4, seed=1, prefix="s")]
    bad = make_bad_files(images, images / "img000.jpg")
    return {
        "base": base,
        "images": images,
        "good": {n: images / n for n in names},
        "bad": bad,
        "model": save_checkpoint(base / "tiny"),
        "head_model": save_checkpoint(base / "tiny_head", use_head=True),
    }


@pytest.fixture(scope="module")
def reference(data):
    return Reference(data["model"])


def _encode(data, out, *extra, inputs=None, model="model"):
    argv = [*([str(data["images"])] if inputs is None else inputs), *([] if out is None else ["--out", str(out)]),
            "--model", str(data[model]), *BUDGET_ARGS, *extra]
    return encode.main([str(a) for a in argv])


def test_tokens_match_each_image_encoded_alone_and_bad_files_are_recorded(data, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert _encode(data, out, "--shard-size", "4", "--max-tokens", "100") == 0
    captured = capsys.readouterr()
    assert "RANDOMLY INITIALISED" not in captured.err
    assert re.search(r"encoded 10 images, skipped 0 already done, 3 errors in this run", captured.out)
    features, grids = readme_loader()(str(out), with_grids=True)
    assert_matches_reference(features, data["good"], reference)
    for item_id, path in data["good"].items():
        assert grids[item_id] == reference(path)[2]
    shards = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    # 13 inputs in id order, 4 per chunk: the 4th chunk is a lone bad file, so no 4th shard
    assert shards == [f"train-r00000-{i:06d}.safetensors" for i in range(1, 4)]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == data["bad"]
    assert all(e["error"] and e["source"].endswith(e["id"]) for e in errors)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]

    # rerun: nothing left to do, errors not retried and not duplicated; --strict reports them with status 1
    assert _encode(data, out, "--strict") == 1
    assert "encoded 0 images, skipped 13 already done, 0 errors in this run, 3 inputs with errors" in capsys.readouterr().out
    assert len((out / "errors.jsonl").read_text().splitlines()) == 3
    # --retry-errors tries them again (and records them again, once each)
    assert _encode(data, out, "--retry-errors") == 0
    assert "encoded 0 images, skipped 10 already done, 3 errors in this run" in capsys.readouterr().out
    assert len((out / "errors.jsonl").read_text().splitlines()) == 3


def test_workers_and_token_budget_do_not_change_features(data, reference, tmp_path):
    out = tmp_path / "workers"
    assert _encode(data, out, "--workers", "2", "--max-tokens", "64", "--shard-size", "3") == 0
    assert_matches_reference(readme_loader()(str(out)), data["good"], reference)


def test_output_files_have_normal_permissions(data, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "perm"
        assert _encode(data, out, inputs=[str(data["good"]["img001.png"])]) == 0
    finally:
        os.umask(old)
    files = [p for p in out.iterdir() if p.name != ".lock"]  # .lock: the empty file a running job holds locked
    assert {p.name for p in files} == {"_manifest.json", "train-r00000-000001.safetensors"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)


def test_pooled_features_head_mean_and_normalized(data, tmp_path):
    head_ref = Reference(data["head_model"])
    some = {k: data["good"][k] for k in ("img000.jpg", "img001.png", "sub/s002.jpg")}
    inputs = [str(data["images"])]

    out = tmp_path / "head"
    assert _encode(data, out, "--features", "pooled", inputs=inputs, model="head_model") == 0
    pooled = readme_loader()(str(out))
    assert_matches_reference(pooled, data["good"], head_ref, pooled=True)

    out = tmp_path / "mean"
    assert _encode(data, out, "--features", "pooled", "--pool", "mean", "--normalize", inputs=inputs,
                   model="head_model") == 0
    pooled = readme_loader()(str(out))
    for item_id, path in some.items():
        expected = torch.nn.functional.normalize(head_ref(path)[0].mean(0), dim=-1)
        torch.testing.assert_close(pooled[item_id], expected, atol=1e-5, rtol=1e-4)

    # no head: auto falls back to the token mean, an explicit --pool head is refused before any image is encoded
    out = tmp_path / "auto_mean"
    assert _encode(data, out, "--features", "pooled", inputs=inputs) == 0
    pooled = readme_loader()(str(out))
    ref = Reference(data["model"])
    for item_id, path in some.items():
        torch.testing.assert_close(pooled[item_id], ref(path)[0].mean(0), atol=1e-5, rtol=1e-4)
    with pytest.raises(encode.UsageError, match="no pooling head"):
        encode.run(encode.build_parser().parse_args(
            [*inputs, "--model", str(data["model"]), "--features", "pooled", "--pool", "head", *BUDGET_ARGS,
             "--shard-size", "10"]), encode.Dist())


def test_parquet_reads_back_with_pyarrow_and_datasets(data, reference, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pyarrow_dataset = pytest.importorskip("pyarrow.dataset")

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    out = tmp_path / "parquet"
    assert _encode(data, out, "--format", "parquet", "--shard-size", "6") == 0
    assert (out / "errors.jsonl").is_file()  # sits next to the shards; both readers below leave it out

    table = pyarrow_dataset.dataset(str(out), format="parquet", ignore_prefixes=[".", "_", "errors."]).to_table()
    rows = table.to_pylist()
    features = {r["id"]: torch.tensor(r["embedding"]).reshape(r["shape"]) for r in rows}
    assert_matches_reference(features, data["good"], reference)
    for r in rows:
        assert r["grid_thws"] == reference(data["good"][r["id"]])[2]
        with PIL.Image.open(data["good"][r["id"]]) as image:
            assert [r["width"], r["height"]] == list(image.size)

    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert sorted(loaded["id"]) == sorted(data["good"])
    row = loaded[0]
    torch.testing.assert_close(torch.tensor(row["embedding"]).reshape(row["shape"]),
                               features[row["id"]], atol=0, rtol=0)


def test_dataset_input_save_to_disk_and_parquet(data, reference, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    paths = [data["good"][k] for k in ("img002.jpg", "sub/s001.png", "img005.png")]
    ds = datasets.Dataset.from_dict({"picture": [str(p) for p in paths], "label": [0, 1, 2]})
    ds = ds.cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "pq" / "data.parquet"))
    expected = {str(i): p for i, p in enumerate(paths)}
    for source in ("saved", "pq"):
        out = tmp_path / f"out_{source}"
        assert _encode(data, out, "--dataset", tmp_path / source, "--image-column", "picture", inputs=[]) == 0
        assert_matches_reference(readme_loader()(str(out)), expected, reference)
    with pytest.raises(encode.UsageError, match=r"no column 'image' \(columns: \['picture', 'label'\]\)"):
        encode.open_dataset(str(tmp_path / "saved"), None, "image")


_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)  # as a running job holds it
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
sys.stdin.read()
"""


def test_rerun_with_other_settings_is_refused_and_overwrite_starts_over(data, tmp_path, capsys):
    out = tmp_path / "fp"
    one = [str(data["good"]["img003.png"])]
    assert _encode(data, out, inputs=one) == 0
    capsys.readouterr()
    assert _encode(data, out, "--features", "pooled", inputs=one) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings (features: 'tokens' -> 'pooled'" in err and "--overwrite" in err
    assert _encode(data, out, "--dtype", "bf16", inputs=one) == 2
    assert "dtype: 'fp32' -> 'bf16'" in capsys.readouterr().err
    # throughput settings may change between reruns
    assert _encode(data, out, "--workers", "1", "--max-tokens", "50", "--shard-size", "2", inputs=one) == 0
    assert _encode(data, out, "--features", "pooled", "--overwrite", inputs=one) == 0
    assert json.loads((out / "_manifest.json").read_text())["features"] == "pooled"
    # a second job writing into the same folder at the same time is refused, naming the pid the lock file holds
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _encode(data, out, "--features", "pooled", inputs=one) == 2
        assert f"another navit-encode job (pid {holder.pid}) is writing into" in capsys.readouterr().err
    finally:
        holder.communicate("")
    assert len(readme_loader()(str(out))[one[0]].shape) == 1  # a file given directly: id = the path as given


def test_a_refused_command_leaves_no_settings_behind(data, tmp_path, capsys):
    """A command refused after its arguments parse (no head for --pool head, a bad budget) writes nothing into DIR,
    so the corrected command runs; --pool auto and the explicit pooling it resolves to are the same settings."""
    out, one = tmp_path / "refused", [str(data["good"]["img003.png"])]
    assert _encode(data, out, "--features", "pooled", "--pool", "head", inputs=one) == 2
    assert "no pooling head" in capsys.readouterr().err
    assert _encode(data, out, "--min-pixels", "100000", "--max-pixels", "1000", inputs=one) == 2
    assert not out.exists() or not list(out.iterdir())
    assert _encode(data, out, "--features", "pooled", "--pool", "mean", inputs=one) == 0
    assert _encode(data, out, "--features", "pooled", inputs=one) == 0  # auto resolves to mean: same settings
    assert "skipped 1 already done" in capsys.readouterr().out


def test_another_dataset_or_split_into_the_same_folder_is_refused(data, tmp_path, monkeypatch, capsys):
    """--dataset ids are row numbers: another split (or dataset) must not count as already done."""
    datasets = pytest.importorskip("datasets")

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    paths = [str(data["good"][k]) for k in ("img002.jpg", "img005.png")]
    split = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    out = tmp_path / "out"
    assert _encode(data, out, "--dataset", tmp_path / "dd", "--split", "train", inputs=[]) == 0
    capsys.readouterr()
    assert _encode(data, out, "--dataset", tmp_path / "dd", "--split", "test", inputs=[]) == 2
    assert "other settings (dataset:" in capsys.readouterr().err


def test_bad_inputs_are_named_in_the_summary(data, capsys):
    """Without --out nothing is written, so the summary itself names each bad input and why."""
    assert _encode(data, None, inputs=[str(data["images"] / name) for name in data["bad"]]) == 0
    err = capsys.readouterr().err
    for name in data["bad"]:
        assert f"error: {data['images'] / name}: " in err


def test_cli_errors_are_one_clear_line(data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for folder in ("x", "y"):
        PIL.Image.new("RGB", (40, 40)).save(tmp_path / folder / "same.png")
    model = ["--model", str(data["model"])]
    cases = [
        ([EXAMPLES[0], "--model", str(tmp_path / "nope")], "is not a folder"),
        ([EXAMPLES[0], "--model", str(tmp_path / "empty")], "has no config.json"),
        ([str(tmp_path / "empty"), *model], "the inputs hold no images"),
        ([*model], "no input"),
        ([str(tmp_path / "missing.png"), *model], "no such file or folder"),
        ([str(tmp_path / "x"), str(tmp_path / "y"), *model], "two inputs have the same id 'same.png'"),
        ([EXAMPLES[0], EXAMPLES[0], *model], "same id"),
        ([EXAMPLES[0], "--max-tokens", "0", *model], "--max-tokens must be positive"),
        ([EXAMPLES[0], "--out", str(tmp_path / "x.safetensors"), *model], "is an output folder"),
        (["@" + str(tmp_path / "list.txt"), *model], "no such list file"),
        ([EXAMPLES[0], "--pool", "mean", *model], "--features pooled only"),
        ([EXAMPLES[0], "--config-overrides", "hidden_size=8", *model], "only applies to randomly initialised models"),
        ([EXAMPLES[0], "--config-overrides", "no_such_field=1"], "the config has no field 'no_such_field'"),
        ([EXAMPLES[0], "--max-pixels", "4000", *model], "pixel budget: `min_pixels`"),
        ([EXAMPLES[0], "--device", "foo", *model], "expected cpu, cuda or cuda:N"),
        ([EXAMPLES[0], "--attn", "flash_attention_2", *model], ("flash-attn", "FlashAttention2")),  # ours / transformers'
    ]
    if not torch.cuda.is_available():
        cases.append(([EXAMPLES[0], "--device", "cuda", *model], "CUDA is not available"))
    for argv, message in cases:
        assert encode.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        messages = message if isinstance(message, tuple) else (message,)
        assert len(err.splitlines()) == 1 and any(m in err for m in messages), (argv, err)


def test_input_ids_from_folders_globs_lists_and_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel in ("d/b.png", "d/a.JPG", "d/sub/c.webp", "d/.hidden/x.png", "d/notes.txt", "d/.y.png", "e/z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    Path("list.txt").write_text("e/z.png\n\n# comment\nd/sub\n")
    expand = encode.expand_input
    assert [i.id for i in expand("d")] == ["a.JPG", "b.png", "sub/c.webp"]
    assert [i.path for i in expand("d")] == [os.path.join("d", "a.JPG"), os.path.join("d", "b.png"),
                                             os.path.join("d", "sub", "c.webp")]
    assert [i.id for i in expand("e/z.png")] == ["e/z.png"]  # a file: the path as given
    assert [i.id for i in expand("d/*.png")] == ["d/b.png"]
    assert [i.id for i in expand("@list.txt")] == ["e/z.png", "c.webp"]


def test_ranks_partition_the_ids_independently_of_order():
    ids = [f"folder/{i}.jpg" for i in range(2000)]
    for world in (1, 2, 3, 8):
        owners = [encode.owner_rank(i, world) for i in ids]
        assert set(owners) == set(range(world))
        counts = [owners.count(r) for r in range(world)]
        assert max(counts) - min(counts) < 0.2 * len(ids) / world  # close to even
        assert [encode.owner_rank(i, world) for i in reversed(ids)] == owners[::-1]


def test_batches_keep_the_token_budget_and_never_cross_a_shard(data):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(data["model"]), trust_remote_code=True)
    items = [i for i in encode.expand_input(str(data["images"])) if i.id != "zz_truncated.jpg"]
    unreadable = {"zz_empty.png", "zz_text.png"}
    # independent costs: the patch count of each image as the processor actually makes it
    cost = {n: int(processor(images=str(i.path), **BUDGET)["grid_thws"].prod()) for n, i in enumerate(items)
            if i.id not in unreadable}
    batches = list(encode.TokenBudgetBatches(items, None, processor, BUDGET, max_tokens=100, shard_size=4))
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    assert max(cost.values()) <= 100 < sum(cost.values())
    for batch in batches:
        assert len({i // 4 for i in batch}) == 1
        if any(items[i].id in unreadable for i in batch):
            assert len(batch) == 1  # an unreadable header gets a batch of its own; its worker records the error
        else:
            assert sum(cost[i] for i in batch) <= 100
    assert len(batches) < len(items)  # images were batched together


def test_header_size_follows_exif_orientation(tmp_path):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as 40 wide, 120 high
    PIL.Image.new("RGB", (120, 40)).save(tmp_path / "r.jpg", exif=exif)
    item = encode.Item("r.jpg", path=str(tmp_path / "r.jpg"))
    assert encode.header_size(item, None) == (40, 120)
    assert encode.decode_image(item, None).size == (40, 120)


def test_pooled_features_per_image_or_per_frame_and_token_split():
    """A head with one row per image, one per frame (DINOv3-style CLS), or none (token mean); tokens split by grid."""
    from types import SimpleNamespace

    grids = torch.tensor([[1, 2, 2], [2, 2, 4], [1, 2, 6]])  # 4 + 16 + 12 patches, frames 1 + 2 + 1
    hidden = torch.randn(32, 8)
    per_image, per_frame = torch.randn(3, 8), torch.randn(4, 8)
    out = SimpleNamespace(last_hidden_state=hidden, pooler_output=per_image)
    tokens = encode.per_image_features(out, grids, "tokens", None, False)
    assert [t.tolist() for t in tokens] == [hidden[:4].tolist(), hidden[4:20].tolist(), hidden[20:].tolist()]
    head = encode.per_image_features(out, grids, "pooled", "head", False)
    assert [p.tolist() for p in head] == [r.tolist() for r in per_image]
    out.pooler_output = per_frame
    frames = encode.per_image_features(out, grids, "pooled", "head", False)
    assert [p.tolist() for p in frames] == [per_frame[0].tolist(), per_frame[1:3].tolist(), per_frame[3].tolist()]
    mean = encode.per_image_features(out, grids, "pooled", "mean", True)
    torch.testing.assert_close(mean[1], hidden[4:20].mean(0) / hidden[4:20].mean(0).norm())
    out.pooler_output = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="pooler_output has 2 rows for 3 images"):
        encode.per_image_features(out, grids, "pooled", "head", False)


@pytest.mark.parametrize("has_bf16", [True, False])
def test_dtype_auto_is_bf16_exactly_on_a_cpu_with_native_bf16_matmuls(has_bf16, data, tmp_path, capsys, monkeypatch):
    """The default `--dtype auto`: bf16 where the CPU multiplies bf16 natively, else fp32; the summary says which
    and why in one line, and the manifest records the dtype it resolved to (a rerun elsewhere is compared with it)."""
    from siglip2_navit import navit_attention

    monkeypatch.setattr(navit_attention, "cpu_has_bf16_matmul", lambda: has_bf16)
    out = tmp_path / "auto"
    one = [str(data["good"]["img003.png"])]
    argv = [*one, "--out", str(out), "--model", str(data["model"]), *BUDGET_ARGS[:4]]  # no --dtype: auto
    assert encode.main(argv) == 0
    name = "bf16" if has_bf16 else "fp32"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dtype: ")]
    assert len(lines) == 1 and lines[0].startswith(f"dtype: {name} (--dtype auto: this CPU ")
    assert next(iter(readme_loader()(str(out)).values())).dtype == encode.DTYPES[name]
    other = "fp32" if has_bf16 else "bf16"
    assert encode.main([*argv, "--dtype", other]) == 2
    assert f"dtype: '{name}' -> '{other}'" in capsys.readouterr().err


def test_bf16_run_stores_bf16_tokens_close_to_fp32(data, reference, tmp_path, capsys):
    out = tmp_path / "bf16"
    some = ["img000.jpg", "sub/s003.png"]
    assert _encode(data, out, "--dtype", "bf16", "--table", inputs=[str(data["images"])]) == 0
    table = capsys.readouterr().out
    assert "original (WxH)" in table and re.search(r"^sub/s003\.png\s+\d+x\d+", table, re.M)  # --table with --out
    features = readme_loader()(str(out))
    for item_id in some:
        assert features[item_id].dtype == torch.bfloat16
        expected = reference(data["good"][item_id])[0]
        # bf16 keeps 8 bits of mantissa; two layers of a tiny random model stay within a few percent
        torch.testing.assert_close(features[item_id].float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("family", ["aimv2", "dinov3"])
@pytest.mark.parametrize("features", ["tokens", "pooled"])
def test_other_families_encode_like_each_image_alone(family, features, data, tmp_path):
    """A converted AIMv2 (attention-pool head) or DINOv3 (CLS pooled, prefix tokens never stored) folder: the job's
    tokens / pooled rows equal the model run on each image alone."""
    folder = importlib.import_module(f"test_{family}").readme_folder(tmp_path)
    out = tmp_path / "out"
    inputs = [str(p) for p in data["good"].values()][:4]
    argv = [*inputs, "--out", str(out), "--model", folder, *BUDGET_ARGS, "--features", features, "--max-tokens", "300"]
    assert encode.main([str(a) for a in argv]) == 0
    paths = {p: Path(p) for p in inputs}  # a file given as such is its own id
    assert_matches_reference(readme_loader()(str(out)), paths, Reference(Path(folder)), pooled=features == "pooled")
