# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""scripts/convert_aimv2.py: transformers AIMv2 folders -> AIMv2 NaViT Hub folders (issue 13).

Source folders are written here: tensors named and shaped as transformers' `Aimv2VisionModel` stores them (written out
below from its module layout, independently of the model code, so these tests run on every transformers version), and
real transformers `Aimv2VisionModel` / `Aimv2Model` folders where transformers has them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch
from safetensors.torch import save_file


os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

from conftest import family_code_files  # noqa: E402
from siglip2_navit.tools import checkpoint_utils as utils
from siglip2_navit.tools import safetensors_io  # noqa: E402
from siglip2_navit.tools import convert_aimv2  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoImageProcessor, AutoModel  # noqa: E402


DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # 4.x: torch_dtype


HIDDEN, INTER, LAYERS, HEADS, PATCH = 32, 48, 2, 4, 14
SOURCE_CONFIG = {
    "model_type": "aimv2_vision_model",
    "architectures": ["Aimv2VisionModel"],
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "patch_size": PATCH,
    "image_size": 224,
    "is_native": True,
    "use_head": True,
    "qkv_bias": False,
    "mlp_bias": False,
    "rms_norm_eps": 1e-5,
}
CODE_FILES = set(family_code_files("aimv2"))


def source_shapes(layers: int = LAYERS) -> Dict[str, tuple]:
    """transformers' `Aimv2VisionModel` tensors for SOURCE_CONFIG (native, no biases, with the pooling head)."""
    shapes = {
        "embeddings.patch_embed.weight": (HIDDEN, 3, PATCH, PATCH),
        "embeddings.patch_embed.bias": (HIDDEN,),
        "embeddings.rms_norm.weight": (HIDDEN,),
        "rms_norm.weight": (HIDDEN,),
        "head.k_proj.weight": (HIDDEN, HIDDEN),
        "head.v_proj.weight": (HIDDEN, HIDDEN),
        "head.cls_token": (1, 1, HIDDEN),
        "head.output_proj.weight": (HIDDEN, HIDDEN),
        "head.output_proj.bias": (HIDDEN,),
    }
    for i in range(layers):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}attention.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{layer}ffn.gate_proj.weight"] = shapes[f"{layer}ffn.up_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{layer}ffn.down_proj.weight"] = (HIDDEN, INTER)
        shapes[f"{layer}rms_norm1.weight"] = shapes[f"{layer}rms_norm2.weight"] = (HIDDEN,)
    return shapes


def write_source(
    folder: Path,
    shapes: Optional[Dict[str, tuple]] = None,
    config: Optional[dict] = None,
    preprocessor: Optional[dict] = None,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """A saved `Aimv2VisionModel`-style folder (random tensors, bf16 so that dtype handling shows); returns them."""
    generator = torch.Generator().manual_seed(seed)
    shapes = source_shapes() if shapes is None else shapes
    tensors = {name: torch.randn(shape, generator=generator).to(torch.bfloat16) for name, shape in shapes.items()}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or SOURCE_CONFIG))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return tensors


def processor_settings(folder: Path) -> dict:
    return json.loads((folder / "preprocessor_config.json").read_text())


# ----------------------------------------------------------------------------------------------------------------------
# a complete, strictly loading Hub folder
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_stride", [1, 2])
def test_conversion_writes_a_complete_hub_folder_that_loads_strictly(tmp_path, hidden_stride):
    src, dst = tmp_path / "aimv2", tmp_path / "out" / "navit"
    source = write_source(src)
    assert convert_aimv2.main([str(src), str(dst), "--hidden-stride", str(hidden_stride)]) == 0

    names = {p.name for p in dst.iterdir()}
    assert names == {"model.safetensors", "config.json", "preprocessor_config.json", "processor_config.json", "README.md",
                     "examples", "pictures"} | CODE_FILES
    assert [p.name for p in dst.parent.iterdir()] == ["navit"], "no temp folder may be left behind"
    config = json.loads((dst / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_aimv2_navit.Aimv2NavitConfig",
        "AutoModel": "modeling_aimv2_navit.Aimv2NavitModel",
    }
    assert config["model_type"] == "aimv2_navit" and config["architectures"] == ["Aimv2NavitModel"]
    for key in ("hidden_size", "num_hidden_layers", "patch_size", "is_native", "use_head", "qkv_bias", "rms_norm_eps"):
        assert config[key] == SOURCE_CONFIG[key], key
    assert (config["hidden_stride"], config["hidden_act"], config["intermediate_size"]) == (hidden_stride, "silu", INTER)

    model, info = AutoModel.from_pretrained(dst, trust_remote_code=True, output_loading_info=True, **{DTYPE_KWARG: "auto"})
    assert type(model).__name__ == "Aimv2NavitModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = model.state_dict()
    assert set(state) == set(source)
    for name, tensor in source.items():
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], tensor), name

    processor = AutoImageProcessor.from_pretrained(dst, trust_remote_code=True)
    assert (processor.patch_size, processor.hidden_stride, processor.temporal_patch_size) == (PATCH, hidden_stride, 1)
    assert AutoConfig.from_pretrained(dst, trust_remote_code=True).model_type == "aimv2_navit"


def test_processor_takes_the_source_normalisation_else_aimv2_defaults(tmp_path):
    source_processor = {
        "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.5, 0.25, 0.125],
        "image_std": [0.2, 0.3, 0.4],
        "resample": 2,
        "crop_size": {"height": 224, "width": 224},  # fixed-size settings of the source do not carry over
    }
    write_source(tmp_path / "with", preprocessor=source_processor)
    write_source(tmp_path / "without")
    with_dst = convert_aimv2.convert(tmp_path / "with", tmp_path / "with-navit")
    without_dst = convert_aimv2.convert(tmp_path / "without", tmp_path / "without-navit")

    carried = processor_settings(with_dst)
    assert (carried["image_mean"], carried["image_std"], carried["resample"]) == ([0.5, 0.25, 0.125], [0.2, 0.3, 0.4], 2)
    assert "crop_size" not in carried
    defaults = processor_settings(without_dst)
    assert defaults["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP, as transformers' AIMv2
    assert defaults["image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert defaults["resample"] == 3  # bicubic
    for folder, mean in ((with_dst, [0.5, 0.25, 0.125]), (without_dst, defaults["image_mean"])):
        assert list(AutoImageProcessor.from_pretrained(folder, trust_remote_code=True).image_mean) == pytest.approx(mean)


def test_model_card_names_the_source(tmp_path):
    write_source(tmp_path / "aimv2")
    dst = convert_aimv2.convert(tmp_path / "aimv2", tmp_path / "navit", base_model="apple/aimv2-large-patch14-native")
    card = (dst / "README.md").read_text()
    assert card.startswith("---\nbase_model: apple/aimv2-large-patch14-native\n")
    assert "Weights converted from [apple/aimv2-large-patch14-native]" in card and "navit-convert aimv2" in card


def test_dtype_option_casts_the_weights(tmp_path):
    write_source(tmp_path / "aimv2")
    dst = convert_aimv2.convert(tmp_path / "aimv2", tmp_path / "navit", dtype="float32")
    model = AutoModel.from_pretrained(dst, trust_remote_code=True, **{DTYPE_KWARG: "auto"})
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ----------------------------------------------------------------------------------------------------------------------
# refusals: nothing is written
# ----------------------------------------------------------------------------------------------------------------------


def test_refuses_a_shape_mismatch_before_writing(tmp_path):
    shapes = source_shapes()
    shapes["encoder.layers.1.ffn.up_proj.weight"] = (INTER + 8, HIDDEN)
    write_source(tmp_path / "aimv2", shapes=shapes)
    with pytest.raises(utils.ConversionError, match=r"layers\.1\.ffn\.up_proj\.weight: checkpoint \(56, 32\) vs config \(48, 32\)"):
        convert_aimv2.convert(tmp_path / "aimv2", tmp_path / "navit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aimv2"]


def test_refuses_missing_and_unexpected_tensors(tmp_path, capsys):
    shapes = source_shapes()
    del shapes["head.cls_token"]
    shapes["encoder.layers.2.rms_norm1.weight"] = (HIDDEN,)  # a layer the config does not have
    write_source(tmp_path / "aimv2", shapes=shapes)
    assert convert_aimv2.main([str(tmp_path / "aimv2"), str(tmp_path / "navit")]) == 1
    err = capsys.readouterr().err
    assert "missing 1 tensor" in err and "head.cls_token" in err
    assert "no place for: encoder.layers.2.rms_norm1.weight" in err
    assert not (tmp_path / "navit").exists()


def test_refuses_a_non_aimv2_config(tmp_path):
    write_source(tmp_path / "dino", config={"model_type": "dinov3_vit"})
    with pytest.raises(utils.ConversionError, match="model_type 'dinov3_vit'.*AIMv2"):
        convert_aimv2.convert(tmp_path / "dino", tmp_path / "navit")


def test_refuses_a_config_the_model_cannot_take(tmp_path):
    write_source(tmp_path / "aimv2", config={**SOURCE_CONFIG, "num_attention_heads": 5})
    with pytest.raises(utils.ConversionError, match="Cannot build an Aimv2NavitConfig.*divisible by `num_attention_heads`"):
        convert_aimv2.convert(tmp_path / "aimv2", tmp_path / "navit")


def test_refuses_pickle_only_sources(tmp_path):
    src = tmp_path / "legacy"
    write_source(src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")  # the same folder, weights as a (never read) pickle
    with pytest.raises(utils.ConversionError, match="pickle weights .*pytorch_model.bin.*safetensors"):
        convert_aimv2.convert(src, tmp_path / "navit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy"]


def test_existing_destination_needs_overwrite_and_a_failed_overwrite_keeps_it(tmp_path, monkeypatch, capsys):
    src, dst = tmp_path / "aimv2", tmp_path / "navit"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    write_source(src)
    assert convert_aimv2.main([str(src), str(dst)]) == 1
    refusal = capsys.readouterr().err
    assert "already exists; pass --overwrite" in refusal and (dst / "keep.txt").read_text() == "old"

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(utils, "save_file", disk_full)  # fails half-way: config.json already written in the temp folder
        with pytest.raises(OSError, match="disk full"):
            convert_aimv2.convert(src, dst, overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aimv2", "navit"]

    assert convert_aimv2.main([str(src), str(dst), "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aimv2", "navit"]


def test_hidden_stride_is_checked_by_the_cli(tmp_path):
    write_source(tmp_path / "aimv2")
    with pytest.raises(SystemExit):
        convert_aimv2.main([str(tmp_path / "aimv2"), str(tmp_path / "navit"), "--hidden-stride", "3"])
    assert not (tmp_path / "navit").exists()


def test_help_and_running_as_a_script(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_aimv2.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("SRC", "DST", "--hidden-stride", "--base-model", "--overwrite"))

    write_source(tmp_path / "aimv2")
    script = str(ROOT / "scripts" / "convert_aimv2.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, script, str(tmp_path / "aimv2"), str(tmp_path / "navit")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "navit" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# real transformers folders
# ----------------------------------------------------------------------------------------------------------------------


def test_aimv2model_folder_converts_its_vision_tower_only(tmp_path, monkeypatch):
    if not hasattr(transformers, "Aimv2Model"):
        pytest.skip(f"transformers {transformers.__version__} has no Aimv2Model")
    vision = {k: v for k, v in SOURCE_CONFIG.items() if k not in ("model_type", "architectures")}
    config = transformers.Aimv2Config(
        vision_config=vision,
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    source = transformers.Aimv2Model(config)
    source.save_pretrained(tmp_path / "aimv2")
    touched = []
    real_safe_open = safetensors_io.safe_open

    class RecordingHandle:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, key):
            touched.append(key)
            return self.handle.get_slice(key)

        def get_tensor(self, key):
            touched.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr(safetensors_io, "safe_open", RecordingHandle)
    dst = convert_aimv2.convert(tmp_path / "aimv2", tmp_path / "navit", hidden_stride=2)
    assert touched and all(key.startswith("vision_model.") for key in touched), sorted(set(touched))

    model, info = AutoModel.from_pretrained(dst, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = source.vision_model.state_dict()
    expected.pop("embeddings.position_ids", None)  # a non-persistent buffer (older transformers list it)
    assert set(model.state_dict()) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_aimv2model_folder_without_a_vision_tower_is_refused(tmp_path):
    shapes = {"text_model.rms_norm.weight": (HIDDEN,)}
    write_source(tmp_path / "aimv2", shapes=shapes, config={"model_type": "aimv2", "vision_config": {}})
    with pytest.raises(utils.ConversionError, match="text tower but no `vision_model.\\*` tensors"):
        convert_aimv2.convert(tmp_path / "aimv2", tmp_path / "navit")
