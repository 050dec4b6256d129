# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""scripts/push_to_hub.py: validation, dry run, and what a (mocked) upload would send. No network."""

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

from siglip2_navit.tools import checkpoint_utils as utils  # noqa: E402
from siglip2_navit.tools import push as push_to_hub  # noqa: E402
from siglip2_navit import Siglip2NavitConfig, Siglip2NavitModel  # noqa: E402


PUBLISHED = sorted(
    [
        "README.md",
        "config.json",
        "configuration_siglip2_navit.py",
        "image_processing_siglip2_navit.py",
        "model.safetensors",
        "modeling_siglip2_navit.py",
        "navit_attention.py",
        "navit_batching.py",
        "navit_core.py",
        "navit_image_utils.py",
        "navit_layout.py",
        "pipeline_navit.py",
        "preprocessor_config.json",
        "processor_config.json",
    ]
    # the example images the model card's code opens, as in this checkout, and the card's pictures (MAP head:
    # features and attention)
    + [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "examples").rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)  # no OS litter
    ]
    + ["pictures/chelsea.attention.png", "pictures/chelsea.features.png"]
)


@pytest.fixture
def model_dir(tmp_path):
    """A complete tiny model folder, plus litter that must never be uploaded."""
    config = Siglip2NavitConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, vision_use_head=True
    )
    torch.manual_seed(0)
    state_dict = Siglip2NavitModel(config).state_dict()
    folder = utils.atomic_write_folder(tmp_path / "tiny", lambda tmp: utils.save_model_folder(tmp, state_dict, config))
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "modeling_siglip2_navit.cpython-311.pyc").write_bytes(b"\x00")
    (folder / ".DS_Store").write_bytes(b"\x00")
    return folder


class _NoNetwork:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a dry run / failed validation must not touch the Hub")


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--repo-id" in out and "--dry-run" in out and "--private" in out


def test_dry_run_validates_and_lists_files(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(push_to_hub, "HfApi", _NoNetwork)
    assert push_to_hub.main([str(model_dir), "--repo-id", "someone/tiny-navit", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == PUBLISHED
    assert f"Would upload {len(PUBLISHED)} files (" in out and "MB) to someone/tiny-navit (public):" in out
    assert "Dry run: nothing was uploaded." in out
    assert "features (" in out  # the forward pass ran


@pytest.mark.parametrize("family_module", ["test_aimv2", "test_dinov3"])
def test_dry_run_validates_every_family(family_module, tmp_path, monkeypatch, capsys):
    """A converted folder of each family passes the static checks, loads and runs (its own config class and head)."""
    folder = importlib.import_module(family_module).readme_folder(tmp_path)
    monkeypatch.setattr(push_to_hub, "HfApi", _NoNetwork)
    assert push_to_hub.main([folder, "--repo-id", "someone/tiny-navit", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "features (" in out and "Dry run: nothing was uploaded." in out


def _expect_refusal(model_dir, monkeypatch, capsys, *messages):
    monkeypatch.setattr(push_to_hub, "HfApi", _NoNetwork)
    assert push_to_hub.main([str(model_dir), "--repo-id", "someone/tiny-navit"]) == 1
    err = capsys.readouterr().err
    assert all(message in err for message in messages), err


def test_refuses_pickle_files(model_dir, monkeypatch, capsys):
    torch.save({"x": torch.zeros(1)}, model_dir / "pytorch_model.bin")
    _expect_refusal(model_dir, monkeypatch, capsys, "Pickle files are not published")


def test_refuses_missing_safetensors(model_dir, monkeypatch, capsys):
    (model_dir / "model.safetensors").unlink()
    _expect_refusal(model_dir, monkeypatch, capsys, "No model.safetensors")


def test_refuses_processor_model_disagreement(model_dir, monkeypatch, capsys):
    for name in ("preprocessor_config.json", "processor_config.json"):
        data = json.loads((model_dir / name).read_text())
        (data.get("image_processor") or data)["hidden_stride"] = 1
        (model_dir / name).write_text(json.dumps(data))
    _expect_refusal(model_dir, monkeypatch, capsys, "hidden_stride: processor 1 vs model 2")


def test_refuses_diverging_processor_files(model_dir, monkeypatch, capsys):
    data = json.loads((model_dir / "processor_config.json").read_text())
    data["image_processor"]["max_pixels"] = 1024 * 1024
    (model_dir / "processor_config.json").write_text(json.dumps(data))
    _expect_refusal(model_dir, monkeypatch, capsys, "preprocessor_config.json and processor_config.json")


def test_refuses_incomplete_weights(model_dir, monkeypatch, capsys):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["vision_model.head.probe"]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    _expect_refusal(model_dir, monkeypatch, capsys, "vision_model.head.probe")


def test_refuses_missing_remote_code(model_dir, monkeypatch, capsys):
    (model_dir / "modeling_siglip2_navit.py").unlink()
    _expect_refusal(model_dir, monkeypatch, capsys, "Missing from")


def test_refuses_card_without_front_matter(model_dir, monkeypatch, capsys):
    (model_dir / "README.md").write_text("# a model\n")
    _expect_refusal(model_dir, monkeypatch, capsys, "YAML front matter")


def test_refuses_weights_of_the_wrong_shape(model_dir, monkeypatch, capsys):
    tensors = load_file(model_dir / "model.safetensors")
    name = next(n for n in tensors if n.endswith("mlp.fc1.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0] + 6, tensors[name].shape[1])
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    _expect_refusal(model_dir, monkeypatch, capsys, name.removesuffix(".weight").split(".")[-1])


# ----------------------------------------------------------------------------------------------------------------------
# foreign code: checked statically, before anything of the folder is imported or run
# ----------------------------------------------------------------------------------------------------------------------


def _set_auto_map(folder, file_name, auto_class, ref):
    data = json.loads((folder / file_name).read_text())
    data.setdefault("auto_map", {})[auto_class] = ref
    (folder / file_name).write_text(json.dumps(data))


def _plant_code(folder, relative_path, marker):
    """A Python file that, if it ever runs, writes `marker`."""
    path = folder / relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass EvilModel:\n    pass\n")


def _foreign_referenced(folder, marker):
    _plant_code(folder, "evil.py", marker)
    _set_auto_map(folder, "config.json", "AutoModel", "evil.EvilModel")


def _foreign_unreferenced(folder, marker):
    _plant_code(folder, "evil.py", marker)


def _foreign_in_subfolder(folder, marker):
    _plant_code(folder, "examples/helper.py", marker)


def _modified_modeling_file(folder, marker):
    path = folder / "modeling_siglip2_navit.py"
    path.write_text(path.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")


def _processor_from_elsewhere(folder, marker):
    _plant_code(folder, "evil.py", marker)
    _set_auto_map(folder, "preprocessor_config.json", "AutoImageProcessor", "evil.EvilModel")


def _code_of_another_repo(folder, marker):
    _set_auto_map(folder, "config.json", "AutoModel", "attacker/repo--modeling_siglip2_navit.Siglip2NavitModel")


def _tokenizer_code_of_another_repo(folder, marker):
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x/y--tok.Tok", None]}}))


def _undefined_class(folder, marker):
    _set_auto_map(folder, "config.json", "AutoModel", "modeling_siglip2_navit.EvilModel")


def _nested_processor_ref_elsewhere(folder, marker):
    data = json.loads((folder / "processor_config.json").read_text())
    data["image_processor"]["auto_map"]["AutoImageProcessor"] = "other/repo--image_processing_siglip2_navit.X"
    (folder / "processor_config.json").write_text(json.dumps(data))


def _custom_pipeline_elsewhere(folder, marker):
    config = json.loads((folder / "config.json").read_text())
    config["custom_pipelines"] = {"image-feature-extraction": {"impl": "pipeline_evil.EvilPipeline", "pt": []}}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "plant, message",
    [
        (_foreign_referenced, "not this project's remote code: evil.py"),
        (_foreign_unreferenced, "not this project's remote code: evil.py"),
        (_foreign_in_subfolder, "not this project's remote code: examples/helper.py"),
        (_modified_modeling_file, "modeling_siglip2_navit.py in"),
        (_processor_from_elsewhere, "not this project's remote code: evil.py"),
        (_code_of_another_repo, "config.json auto_map.AutoModel = 'attacker/repo--modeling_siglip2_navit"),
        (_tokenizer_code_of_another_repo, "tokenizer_config.json auto_map.AutoTokenizer = 'x/y--tok.Tok'"),
        (_undefined_class, "modeling_siglip2_navit.py defines no EvilModel"),
        (_nested_processor_ref_elsewhere, "processor_config.json auto_map.AutoImageProcessor = 'other/repo--"),
        (_custom_pipeline_elsewhere, "custom_pipelines.image-feature-extraction.impl = 'pipeline_evil.EvilPipeline' "
         "points at pipeline_evil.py, which is not this project's remote code"),
    ],
)
def test_dry_run_refuses_foreign_code_without_running_it(model_dir, tmp_path, monkeypatch, capsys, plant, message):
    marker = tmp_path / "foreign-code-ran"
    plant(model_dir, marker)
    monkeypatch.setattr(push_to_hub, "HfApi", _NoNetwork)
    assert push_to_hub.main([str(model_dir), "--repo-id", "someone/tiny-navit", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert not marker.exists(), "the folder's code ran before it was checked"


def test_refuses_missing_image_processor_reference(model_dir, monkeypatch, capsys):
    data = json.loads((model_dir / "preprocessor_config.json").read_text())
    del data["auto_map"]
    (model_dir / "preprocessor_config.json").write_text(json.dumps(data))
    _expect_refusal(model_dir, monkeypatch, capsys, "preprocessor_config.json has no auto_map.AutoImageProcessor")


# ----------------------------------------------------------------------------------------------------------------------
# pickles recognised by content, whatever their name
# ----------------------------------------------------------------------------------------------------------------------


def _torch_zip(path):
    torch.save({"x": torch.zeros(2)}, path)


def _torch_legacy(path):
    torch.save({"x": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)


def _compressed(opener):
    def write(path):
        import pickle

        with opener(path, "wb") as f:
            f.write(pickle.dumps({"state": [1, 2, 3]}, protocol=4))

    return write


def _numpy_objects(path):
    import numpy as np

    with open(path, "wb") as f:  # np.save of an object array pickles its items
        np.save(f, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


class _RunsCode:
    """Unpickling this calls `print` (the stand-in for any callable an attacker names)."""

    def __reduce__(self):
        return (print, ("unpickled",))


def _text_pickle(protocol, padding=0):
    def write(path):
        import pickle

        path.write_bytes(pickle.dumps(["x" * padding, _RunsCode()], protocol=protocol))

    return write


def _numpy_objects_bare_descr(path):
    """An object array whose header says `'O'` (numpy still reads it as objects, i.e. unpickles it)."""
    _numpy_objects(path)
    path.write_bytes(path.read_bytes().replace(b"'descr': '|O'", b"'descr': 'O' "))


def _npz_with_an_object_array_last(path):
    import numpy as np

    arrays = {f"plain{i:03d}": np.zeros(2) for i in range(70)}
    np.savez(path, **arrays, zz=np.array([{"a": 1}], dtype=object))


def _gzip_open(path, mode):
    import gzip

    return gzip.open(path, mode)


def _bz2_open(path, mode):
    import bz2

    return bz2.open(path, mode)


def _xz_open(path, mode):
    import lzma

    return lzma.open(path, mode)


@pytest.mark.parametrize(
    "name, write, kind",
    [
        ("arr.npy", _torch_zip, "data.pkl"),
        ("examples/weights.dat", _torch_zip, "data.pkl"),
        ("legacy.npy", _torch_legacy, "a pickle (protocol 2)"),
        ("optimizer.pkl.gz", _compressed(_gzip_open), "compressed a pickle (protocol 4)"),
        ("state.bz2", _compressed(_bz2_open), "compressed a pickle"),
        ("state.xz", _compressed(_xz_open), "compressed a pickle"),
        ("objects.npy", _numpy_objects, "numpy array of Python objects"),
        ("objects_o.npy", _numpy_objects_bare_descr, "numpy array of Python objects"),
        ("many.npz", _npz_with_an_object_array_last, "member 'zz.npy' is a numpy array of Python objects"),
        ("optimizer.npy", _text_pickle(0), "a pickle (protocol 0/1, text)"),
        ("state.dat", _text_pickle(1), "a pickle (protocol 0/1, text)"),
        ("late_import.dat", _text_pickle(0, padding=20000), "a pickle (protocol 0/1, text)"),  # import past the sniff
        ("late_import_1.dat", _text_pickle(1, padding=300000), "a pickle (protocol 0/1, text)"),
    ],
)
def test_refuses_pickles_by_content(model_dir, monkeypatch, capsys, name, write, kind):
    """Each is refused by the allow-list of formats (none of these is one), whatever pickle it hides (`kind`)."""
    (model_dir / name).parent.mkdir(exist_ok=True)
    write(model_dir / name)
    _expect_refusal(model_dir, monkeypatch, capsys, "not of a published format", f"{name} (")


def test_refuses_links_out_of_the_folder(model_dir, tmp_path, monkeypatch, capsys):
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    (model_dir / "notes.txt").symlink_to(secret)
    _expect_refusal(model_dir, monkeypatch, capsys, "notes.txt links to", "outside")


def test_refuses_non_finite_weights_the_sample_forward_does_not_use(model_dir, monkeypatch, capsys):
    """The MAP head's probe is used; the position table rows of a grid the sample image never has are not: a NaN
    there passes any forward-based check."""
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    name = "vision_model.embeddings.position_embedding.weight"
    tensors[name][-1, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    _expect_refusal(model_dir, monkeypatch, capsys, name, "non-finite")


def test_refuses_malformed_weights_in_one_line(model_dir, monkeypatch, capsys):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    _expect_refusal(model_dir, monkeypatch, capsys, "model.safetensors (not safetensors: the tensors cover")
