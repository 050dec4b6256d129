"""navit-encode's WebDataset input (.tar shards: nested in folders, given, by file:// URL glob; good, corrupt, missing
and truncated members; the .json as `meta`), `--id-column`, and NavitBatchEncoder called directly (no Ray needed).
Features are checked against each image encoded on its own (encode_testutils.Reference)."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest
import torch

from encode_testutils import (
    BUDGET,
    BUDGET_ARGS,
    Reference,
    load_encode_module,
    make_images,
    make_shard,
    save_checkpoint,
)


encode = load_encode_module()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards: a/shard-00000.tar (3 samples with .json, a corrupt image, a sample without image), b/c/shard-00001.tar
    (2 PNG samples), trunc.tar (a shard cut inside its second sample's image)."""
    base = tmp_path_factory.mktemp("wds")
    names = make_images(base / "images", 6)
    files = [base / "images" / n for n in names]
    shards = base / "shards"
    first = []
    for i, path in enumerate(files[:3]):
        first += [(f"k{i:03d}{path.suffix}", path.read_bytes()), (f"k{i:03d}.json", json.dumps({"n": i}).encode())]
    first += [("broken.jpg", files[0].read_bytes()[:200]), ("nopic.json", b"{}"), ("nopic.txt", b"caption")]
    make_shard(shards / "a" / "shard-00000.tar", first)
    make_shard(shards / "b" / "c" / "shard-00001.tar", [(f"p{i}.png", files[3 + i].read_bytes()) for i in range(2)])
    whole = make_shard(base / "whole.tar", [("s0.jpg", files[0].read_bytes()), ("s1.png", files[5].read_bytes())])
    data = whole.read_bytes()
    (shards / "trunc.tar").write_bytes(data[: 512 * 2 + len(files[0].read_bytes()) + 100])  # into s1's data
    expected = {f"a/shard-00000/k{i:03d}": files[i] for i in range(3)}
    expected.update({f"b/c/shard-00001/p{i}": files[3 + i] for i in range(2)})
    expected["trunc/s0"] = files[0]
    return {"base": base, "shards": shards, "expected": expected, "model": save_checkpoint(base / "tiny")}


def _read_parquet(out):
    import pyarrow.parquet as pq

    rows = {}
    for path in sorted(Path(out).glob("train-r*.parquet")):
        table = pq.read_table(path).to_pydict()
        for i, item_id in enumerate(table["id"]):
            assert item_id not in rows  # each id once
            rows[item_id] = {k: table[k][i] for k in table}
    return rows


def test_shards_in_folders_are_streamed_samples_with_errors_and_meta(data, tmp_path, capsys):
    out = tmp_path / "out"
    code = encode.main([str(data["shards"]), "--out", str(out), "--model", str(data["model"]), *BUDGET_ARGS,
                        "--format", "parquet", "--meta", "--shard-size", "4"])
    assert code == 0, capsys.readouterr().err
    rows = _read_parquet(out)
    assert sorted(rows) == sorted(data["expected"])
    reference = Reference(data["model"])
    for item_id, path in data["expected"].items():
        tokens = torch.tensor(rows[item_id]["embedding"]).reshape(rows[item_id]["shape"])
        torch.testing.assert_close(tokens, reference(path)[0], atol=1e-4, rtol=1e-4, msg=item_id)
    assert [rows[f"a/shard-00000/k{i:03d}"]["meta"] for i in range(3)] == [json.dumps({"n": i}) for i in range(3)]
    assert rows["b/c/shard-00001/p0"]["meta"] is None
    errors = {r["id"]: r for r in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == ["a/shard-00000/broken", "a/shard-00000/nopic", "trunc", "trunc/s1"]
    assert "no image member" in errors["a/shard-00000/nopic"]["error"]
    assert "truncated" in errors["trunc/s1"]["error"] and "unreadable WebDataset shard" in errors["trunc"]["error"]
    assert errors["a/shard-00000/broken"]["source"].endswith("shard-00000.tar::broken.jpg")
    assert not [p for p in data["shards"].rglob("*") if p.is_file() and p.suffix != ".tar"]  # nothing extracted


def test_shard_ids_given_directly_by_glob_and_by_url(data):
    shard = data["shards"] / "b" / "c" / "shard-00001.tar"
    assert [i.id for i in encode.expand_input(str(shard))] == ["shard-00001/p0", "shard-00001/p1"]
    assert [i.id for i in encode.expand_input(str(data["shards"] / "*" / "*" / "*.tar"))] == [
        "shard-00001/p0", "shard-00001/p1"]
    items = encode.expand_input(f"file://{data['shards']}/a/*.tar")
    assert [i.id for i in items] == [f"shard-00000/k{i:03d}" for i in range(3)] + ["shard-00000/broken",
                                                                                  "shard-00000/nopic"]
    image = encode.decode_image(items[1], None)
    assert image.size == PIL.Image.open(data["expected"]["a/shard-00000/k001"]).size
    with pytest.raises(encode.UsageError, match="must be WebDataset .tar shards"):
        encode.expand_input(f"file://{data['base']}/images/*.png")
    with pytest.raises(encode.UsageError, match="no such file"):
        encode.expand_input(f"file://{data['base']}/missing.tar")


def test_id_column_gives_the_ids(data, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [data["expected"][f"a/shard-00000/k{i:03d}"] for i in range(3)]
    keys = ["cat-7", "dog-2", "owl-9"]
    pq.write_table(pa.table({"key": keys, "image": [p.read_bytes() for p in files]}), tmp_path / "t.parquet")
    out = tmp_path / "out"
    args = ["--dataset", str(tmp_path / "t.parquet"), "--out", str(out), "--model", str(data["model"]), *BUDGET_ARGS,
            "--format", "parquet"]
    assert encode.main([*args, "--id-column", "key"]) == 0, capsys.readouterr().err
    rows = _read_parquet(out)
    assert sorted(rows) == sorted(keys)
    reference = Reference(data["model"])
    for key, path in zip(keys, files):
        tokens = torch.tensor(rows[key]["embedding"]).reshape(rows[key]["shape"])
        torch.testing.assert_close(tokens, reference(path)[0], atol=1e-4, rtol=1e-4, msg=key)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["dataset"][-1] == "key"
    assert encode.main([*args, "--id-column", "nokey"]) == 2
    assert "no column 'nokey'" in capsys.readouterr().err
    assert encode.main([*args]) == 2  # row-number ids would be other inputs: the manifest refuses the mix
    assert "other settings" in capsys.readouterr().err
    pq.write_table(pa.table({"key": ["a", None], "image": [files[0].read_bytes()] * 2}), tmp_path / "n.parquet")
    assert encode.main(["--dataset", str(tmp_path / "n.parquet"), "--id-column", "key", "--model",
                        str(data["model"])]) == 2
    assert "row 1 has no value" in capsys.readouterr().err
    assert encode.main([str(files[0]), "--id-column", "key", "--model", str(data["model"])]) == 2


def test_batch_encoder_takes_bytes_and_arrays_and_reports_bad_rows(data):
    from siglip2_navit.tools.encode_ray import NavitBatchEncoder

    model = save_checkpoint(data["base"] / "head", use_head=True, seed=3)
    files = [data["expected"][f"a/shard-00000/k{i:03d}"] for i in range(3)]
    images = np.empty(4, dtype=object)
    images[:] = [files[0].read_bytes(), b"not an image", np.asarray(PIL.Image.open(files[1]).convert("RGB")),
                 files[2].read_bytes()]
    encoder = NavitBatchEncoder(model=str(model), max_tokens=70, dtype="fp32", **BUDGET)  # several packed forwards
    out = encoder({"id": np.array(["a", "b", "c", "d"]), "image": images, "caption": np.array(["w", "x", "y", "z"])})
    assert list(out["id"]) == ["a", "b", "c", "d"] and list(out["caption"]) == ["w", "x", "y", "z"]
    assert "image" not in out and out["embedding"].shape == (4, 64) and out["embedding"].dtype == np.float32
    assert [bool(e) for e in out["error"]] == [False, True, False, False]
    assert "UnidentifiedImageError" in out["error"][1] and not out["embedding"][1].any()
    reference = Reference(model)
    for row, path in zip((0, 2, 3), files):
        torch.testing.assert_close(torch.from_numpy(out["embedding"][row]), reference(path)[1], atol=1e-4, rtol=1e-4)
        assert out["grid_thws"][row].tolist() == reference(path)[2]
    assert out["size"][2].tolist() == list(PIL.Image.open(files[1]).size)
    with pytest.raises(ValueError, match="unknown setting 'max_token'"):
        NavitBatchEncoder(model=str(model), max_token=5)
    with pytest.raises(ValueError, match="features='vectors'"):
        NavitBatchEncoder(model=str(model), features="vectors")
