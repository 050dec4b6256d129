# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint conversions (issue #5): Ovis2.5 -> siglip2-navit and SigLIP2 naflex -> siglip2-navit.

Source checkpoints are built inside the tests (tiny configs, no network). Expected values come from the sources:
the Ovis tensors themselves, and transformers' own `Siglip2VisionModel` run on real images processed by
transformers' `Siglip2ImageProcessor`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file


os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

from conftest import family_code_files  # noqa: E402
from siglip2_navit.tools import checkpoint_utils as utils
from siglip2_navit.tools import atomic, safetensors_io  # noqa: E402
from siglip2_navit.tools import convert_ovis as convert_ovis_checkpoint  # noqa: E402
from siglip2_navit.tools import convert_siglip2_naflex  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoImageProcessor, AutoModel  # noqa: E402


# `dtype=` is transformers 5.x's name for 4.x's `torch_dtype=`
DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


# ----------------------------------------------------------------------------------------------------------------------
# a fake Ovis2.5 folder
# ----------------------------------------------------------------------------------------------------------------------

HIDDEN, INTER, LAYERS, HEADS, PATCH, TPS, IMAGE = 32, 48, 3, 2, 4, 2, 32
VIT_CONFIG = {
    "_attn_implementation_autoset": True,
    "_name_or_path": "google/siglip2-so400m-patch16-512",
    "attention_dropout": 0.0,
    "fullatt_block_indexes": "0|2",  # legacy string form
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": HIDDEN,
    "hidden_stride": 2,
    "image_size": IMAGE,
    "intermediate_size": INTER,
    "layer_norm_eps": 1e-06,
    "model_type": "siglip2_navit",
    "num_attention_heads": HEADS,
    "num_channels": 3,
    "num_hidden_layers": LAYERS,
    "num_patches": -1,
    "patch_size": PATCH,
    "preserve_original_pe": True,
    "temporal_patch_size": TPS,
    "torch_dtype": "float32",
    "use_rope": True,
    "window_size": 16,
}


def vit_shapes():
    """Parameter names and shapes of the vision tower, as the Ovis2.5 checkpoint has them (not from the model code)."""
    shapes = {
        "vision_model.embeddings.patch_embedding.weight": (HIDDEN, 3 * TPS, PATCH, PATCH),
        "vision_model.embeddings.patch_embedding.bias": (HIDDEN,),
        "vision_model.embeddings.position_embedding.weight": ((IMAGE // PATCH) ** 2, HIDDEN),
        "vision_model.post_layernorm.weight": (HIDDEN,),
        "vision_model.post_layernorm.bias": (HIDDEN,),
    }
    for i in range(LAYERS):
        layer = f"vision_model.encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = shapes[f"{layer}{norm}.bias"] = (HIDDEN,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
            shapes[f"{layer}self_attn.{proj}.bias"] = (HIDDEN,)
        shapes[f"{layer}mlp.fc1.weight"], shapes[f"{layer}mlp.fc1.bias"] = (INTER, HIDDEN), (INTER,)
        shapes[f"{layer}mlp.fc2.weight"], shapes[f"{layer}mlp.fc2.bias"] = (HIDDEN, INTER), (HIDDEN,)
    return shapes


def write_fake_ovis(folder: Path, drop=(), reshape=None, dtype=torch.bfloat16):
    """A tiny Ovis2.5 folder: two shards + index + config; LLM, visual head and vte tensors around the ViT."""
    generator = torch.Generator().manual_seed(0)
    vit = {
        "visual_tokenizer.vit." + name: torch.randn(shape, generator=generator).to(dtype)
        for name, shape in vit_shapes().items()
        if name not in drop
    }
    if reshape:
        name, shape = reshape
        vit["visual_tokenizer.vit." + name] = torch.randn(shape, generator=generator).to(dtype)
    others = {
        "llm.model.embed_tokens.weight": torch.randn(64, 16).to(dtype),
        "llm.model.layers.0.mlp.up_proj.weight": torch.randn(16, 16).to(dtype),
        "llm.lm_head.weight": torch.randn(64, 16).to(dtype),
        "visual_tokenizer.head.0.weight": torch.randn(8, 4 * HIDDEN).to(dtype),
        "vte.weight": torch.randn(8, 16).to(dtype),
    }
    names = sorted(vit)
    shards = {
        "model-00001-of-00002.safetensors": {**{k: vit[k] for k in names[::2]}, "llm.model.embed_tokens.weight": others["llm.model.embed_tokens.weight"]},
        "model-00002-of-00002.safetensors": {
            **{k: vit[k] for k in names[1::2]},
            **{k: v for k, v in others.items() if k != "llm.model.embed_tokens.weight"},
        },
    }
    folder.mkdir(parents=True)
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({key: shard for key in tensors})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["Ovis2_5"],
        "model_type": "ovis2_5",
        "llm_config": {"model_type": "qwen3", "hidden_size": 16},
        "visual_vocab_size": 8,
        "vit_config": VIT_CONFIG,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return {k[len("visual_tokenizer.vit.") :]: v for k, v in vit.items()}


class _RecordingSafeOpen:
    """Wraps `safe_open` and records every tensor whose data or header entry is touched."""

    def __init__(self, real):
        self.real, self.touched = real, []

    def __call__(self, *args, **kwargs):
        handle = self.real(*args, **kwargs)
        recorder = self

        class Handle:
            def __enter__(self):
                self.inner = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, key):
                recorder.touched.append(key)
                return self.inner.get_tensor(key)

            def get_slice(self, key):
                recorder.touched.append(key)
                return self.inner.get_slice(key)

        return Handle()


def test_ovis_conversion_round_trip(tmp_path, monkeypatch):
    src, dst = tmp_path / "ovis", tmp_path / "out" / "vit"
    source = write_fake_ovis(src)
    recorder = _RecordingSafeOpen(safetensors_io.safe_open)
    monkeypatch.setattr(safetensors_io, "safe_open", recorder)

    assert convert_ovis_checkpoint.main([str(src), str(dst)]) == 0

    assert recorder.touched, "the converter must read through safe_open"
    assert all(key.startswith("visual_tokenizer.vit.") for key in recorder.touched), sorted(set(recorder.touched))
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "processor_config.json",
        *family_code_files("siglip2"),
        "README.md",
        "examples",
        "pictures",
    } == {p.name for p in dst.iterdir()}
    # the images the model card's code opens, and its picture (features only: this model has no pooling query)
    assert sorted(p.name for p in (dst / "examples").iterdir()) == sorted(p.name for p in (ROOT / "examples").iterdir())
    assert sorted(p.name for p in (dst / "pictures").iterdir()) == ["chelsea.features.png"]
    assert not [p for p in dst.parent.iterdir() if p.name != "vit"], "no temp folder may be left behind"

    config = json.loads((dst / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_siglip2_navit.Siglip2NavitConfig",
        "AutoModel": "modeling_siglip2_navit.Siglip2NavitModel",
    }
    assert config["fullatt_block_indexes"] == [0, 2]
    for key in ("hidden_stride", "window_size", "temporal_patch_size", "image_size", "patch_size", "use_rope"):
        assert config[key] == VIT_CONFIG[key], key
    assert config["vision_use_head"] is False
    for name in ("preprocessor_config.json", "processor_config.json"):
        processor = json.loads((dst / name).read_text())
        processor = processor.get("image_processor", processor)
        assert (processor["patch_size"], processor["temporal_patch_size"], processor["hidden_stride"]) == (
            PATCH,
            TPS,
            2,
        )
    assert (dst / "README.md").read_text().startswith("---\n")

    model = AutoModel.from_pretrained(dst, trust_remote_code=True, **{DTYPE_KWARG: "auto"})
    assert type(model).__name__ == "Siglip2NavitModel"
    state = model.state_dict()
    assert set(state) == set(source)
    for name, tensor in source.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name
    assert model.config.fullatt_block_indexes == [0, 2]
    assert [layer.full_attention for layer in model.vision_model.encoder.layers] == [True, False, True]


def test_ovis_dtype_and_base_model(tmp_path):
    src, dst = tmp_path / "ovis", tmp_path / "vit"
    source = write_fake_ovis(src)
    convert_ovis_checkpoint.convert(src, dst, dtype="float32", base_model="AIDC-AI/Ovis2.5-9B")
    card = (dst / "README.md").read_text()
    assert card.startswith("---\nbase_model: AIDC-AI/Ovis2.5-9B\n")
    assert "library_name: transformers" in card.split("\n---", 1)[0]
    assert "Weights converted from [AIDC-AI/Ovis2.5-9B](https://huggingface.co/AIDC-AI/Ovis2.5-9B)" in card
    # the folder's own card (generated for its family), not the source repository's README
    assert "ci:demo" not in card and "source-repo-only" not in card and "No weights here" not in card
    assert "# SigLIP2 (Ovis2.5 vision tower)" in card and "`navit-convert ovis`" in card and "## Usage" in card
    model = AutoModel.from_pretrained(dst, trust_remote_code=True, **{DTYPE_KWARG: "auto"})
    name = "vision_model.embeddings.patch_embedding.weight"
    assert model.state_dict()[name].dtype == torch.float32
    assert torch.equal(model.state_dict()[name], source[name].float())


def test_ovis_refuses_missing_tensor(tmp_path, capsys):
    src, dst = tmp_path / "ovis", tmp_path / "vit"
    write_fake_ovis(src, drop=("vision_model.encoder.layers.1.mlp.fc2.weight",))
    assert convert_ovis_checkpoint.main([str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "missing 1 tensor" in err and "vision_model.encoder.layers.1.mlp.fc2.weight" in err
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ovis"], "nothing may be written on failure"


def test_ovis_refuses_shape_mismatch(tmp_path):
    src, dst = tmp_path / "ovis", tmp_path / "vit"
    write_fake_ovis(src, reshape=("vision_model.encoder.layers.2.mlp.fc1.weight", (INTER + 8, HIDDEN)))
    with pytest.raises(utils.ConversionError, match=r"layers\.2\.mlp\.fc1\.weight: checkpoint \(56, 32\) vs config \(48, 32\)"):
        convert_ovis_checkpoint.convert(src, dst)
    assert not dst.exists()


def test_ovis_refuses_unexpected_tensor(tmp_path):
    src, dst = tmp_path / "ovis", tmp_path / "vit"
    write_fake_ovis(src, reshape=("vision_model.encoder.layers.3.mlp.fc1.weight", (INTER, HIDDEN)))
    with pytest.raises(utils.ConversionError, match=r"no place for: vision_model\.encoder\.layers\.3\.mlp\.fc1"):
        convert_ovis_checkpoint.convert(src, dst)


def test_refuses_existing_destination_unless_overwrite(tmp_path, capsys):
    src, dst = tmp_path / "ovis", tmp_path / "vit"
    write_fake_ovis(src)
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    assert convert_ovis_checkpoint.main([str(src), str(dst)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "old"

    assert convert_ovis_checkpoint.main([str(src), str(dst), "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ovis", "vit"]


def test_refuses_a_destination_that_contains_the_source(tmp_path, capsys):
    """--overwrite replaces DST as a whole: a DST holding SRC would take the source with it."""
    src = tmp_path / "models" / "ovis"
    write_fake_ovis(src)
    for dst in (tmp_path / "models", tmp_path):
        assert convert_ovis_checkpoint.main([str(src), str(dst), "--overwrite"]) == 1
        assert "must not contain the source" in capsys.readouterr().err
    assert (src / "config.json").is_file()


def test_failed_overwrite_keeps_the_old_destination(tmp_path, monkeypatch):
    src, dst = tmp_path / "ovis", tmp_path / "vit"
    write_fake_ovis(src)
    dst.mkdir()
    (dst / "keep.txt").write_text("old")

    def broken(folder, *args, **kwargs):
        (folder / "partial").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(utils, "save_model_folder", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_ovis_checkpoint.convert(src, dst, overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ovis", "vit"]


def test_refuses_pickle_source(tmp_path):
    src = tmp_path / "legacy"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "ovis2_5", "vit_config": VIT_CONFIG}))
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    for convert in (convert_ovis_checkpoint.convert, convert_siglip2_naflex.convert):
        with pytest.raises(utils.ConversionError, match="pickle weights .*pytorch_model.bin.*safetensors"):
            convert(src, tmp_path / "out")


def test_refuses_non_ovis_config(tmp_path):
    src = tmp_path / "ovis"
    write_fake_ovis(src)
    config = json.loads((src / "config.json").read_text())
    del config["vit_config"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(utils.ConversionError, match="no `vit_config`"):
        convert_ovis_checkpoint.convert(src, tmp_path / "out")


@pytest.mark.parametrize("module", [convert_ovis_checkpoint, convert_siglip2_naflex])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "SRC" in out and "DST" in out and "--overwrite" in out


def test_cli_runs_as_a_script(tmp_path):
    """The scripts run from a fresh checkout as `python scripts/<name>.py` (they import their helper by path)."""
    src = tmp_path / "ovis"
    write_fake_ovis(src)
    dst = tmp_path / "vit"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = str(ROOT / "scripts" / "convert_ovis_checkpoint.py")
    done = subprocess.run([sys.executable, script, str(src), str(dst)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "Reading the vision tower" in done.stderr  # the progress bar
    assert (dst / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# SigLIP2 naflex
# ----------------------------------------------------------------------------------------------------------------------

NAFLEX_IMAGES = ("chelsea.png", "camera.png", "horse.png")  # 451x300 RGB, 512x512 L, 400x328 RGBA


def _naflex_vision_config():
    from transformers import Siglip2VisionConfig

    return Siglip2VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=16,
        num_patches=256,  # 16x16 PE grid, as every released naflex checkpoint
        vision_use_head=True,
    )


@pytest.fixture(scope="module")
def naflex_source(tmp_path_factory):
    """A small random transformers Siglip2VisionModel, saved (safetensors)."""
    from transformers import Siglip2VisionModel

    torch.manual_seed(0)
    model = Siglip2VisionModel(_naflex_vision_config()).eval()
    with torch.no_grad():  # make the PE and biases matter (the default init leaves biases at 0)
        for name, param in model.named_parameters():
            if name.endswith("bias") or "position_embedding" in name:
                param.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp("naflex") / "siglip2-naflex"
    model.save_pretrained(folder)
    return folder, model


def _naflex_inputs(max_num_patches):
    try:  # transformers 5.x: the PIL backend has its own class
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil as processor_cls
    except ImportError:  # 4.x: Siglip2ImageProcessor is the PIL one
        from transformers import Siglip2ImageProcessor as processor_cls

    processor = processor_cls(patch_size=16, max_num_patches=max_num_patches)
    images = [Image.open(ROOT / "examples" / name).convert("RGB") for name in NAFLEX_IMAGES]
    return processor(images, return_tensors="pt")


def _raster_to_blocks(tokens, h, w, s):
    """Reorder raster-order tokens [h·w, D] into s×s-block order, with an explicit index loop."""
    order = [
        (i * s + r) * w + (j * s + c) for i in range(h // s) for j in range(w // s) for r in range(s) for c in range(s)
    ]
    return tokens[torch.tensor(order)]


@pytest.mark.parametrize("hidden_stride, max_num_patches", [(1, 256), (2, 224)])
def test_naflex_matches_transformers_siglip2(naflex_source, tmp_path, hidden_stride, max_num_patches):
    folder, reference = naflex_source
    dst = tmp_path / "navit"
    assert convert_siglip2_naflex.main([str(folder), str(dst), "--hidden-stride", str(hidden_stride)]) == 0

    config = json.loads((dst / "config.json").read_text())
    assert (config["pe_interpolation"], config["pe_antialias"], config["use_rope"]) == ("bilinear", True, False)
    assert (config["image_size"], config["hidden_stride"], config["vision_use_head"]) == (256, hidden_stride, True)

    inputs = _naflex_inputs(max_num_patches)
    shapes = inputs["spatial_shapes"].tolist()
    assert len({h * w for h, w in shapes}) > 1, "the batch should need padding"
    with torch.no_grad():
        expected = reference(**inputs)

    model = AutoModel.from_pretrained(dst, trust_remote_code=True).eval()
    pixel_values, grid_thws = convert_siglip2_naflex.naflex_to_packed(
        inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"], hidden_stride=hidden_stride
    )
    assert grid_thws.tolist() == [[1, h, w] for h, w in shapes]
    with torch.no_grad():
        out = model(pixel_values, grid_thws)

    offset, worst = 0, 1.0
    for i, (h, w) in enumerate(shapes):
        ref_tokens = _raster_to_blocks(expected.last_hidden_state[i, : h * w], h, w, hidden_stride)
        ours = out.last_hidden_state[offset : offset + h * w]
        offset += h * w
        cos = F.cosine_similarity(ours, ref_tokens, dim=-1)
        worst = min(worst, cos.min().item())
        assert cos.min().item() >= 0.9999, (i, cos.min().item())
    assert offset == out.last_hidden_state.shape[0]
    pooled_cos = F.cosine_similarity(out.pooler_output, expected.pooler_output, dim=-1)
    assert pooled_cos.min().item() >= 0.9999, pooled_cos
    print(f"hidden_stride={hidden_stride}: min token cosine {worst:.8f}, min pooler cosine {pooled_cos.min():.8f}")


def test_naflex_temporal_patch_size_2_embeds_images_as_the_image_model(naflex_source, tmp_path):
    """--temporal-patch-size 2: the patch embedding is inflated over 2 frames (W/2 per frame, channel order
    (c, t)); the processor of the converted folder duplicates a still image's frame, so images encode exactly as with
    the T = 1 conversion."""
    folder, _ = naflex_source
    image_dst, video_dst = tmp_path / "t1", tmp_path / "t2"
    assert convert_siglip2_naflex.main([str(folder), str(image_dst), "--hidden-stride", "2"]) == 0
    assert convert_siglip2_naflex.main(
        [str(folder), str(video_dst), "--hidden-stride", "2", "--temporal-patch-size", "2"]
    ) == 0
    assert json.loads((video_dst / "config.json").read_text())["temporal_patch_size"] == 2
    image_model = AutoModel.from_pretrained(image_dst, trust_remote_code=True).eval()
    video_model = AutoModel.from_pretrained(video_dst, trust_remote_code=True).eval()
    single = image_model.state_dict()["vision_model.embeddings.patch_embedding.weight"]  # [D, C, p, p]
    inflated = video_model.state_dict()["vision_model.embeddings.patch_embedding.weight"]  # [D, C·2, p, p]
    assert inflated.shape == (single.shape[0], 2 * single.shape[1], *single.shape[2:])
    for channel in range(3):
        for frame in range(2):
            torch.testing.assert_close(inflated[:, 2 * channel + frame], single[:, channel] / 2, rtol=0, atol=0)

    images = [Image.open(ROOT / "examples" / name) for name in NAFLEX_IMAGES]
    outputs = []
    for dst, model in ((image_dst, image_model), (video_dst, video_model)):
        processor = AutoImageProcessor.from_pretrained(dst, trust_remote_code=True)
        assert processor.temporal_patch_size == model.config.temporal_patch_size
        batch = processor(images=images, return_tensors="pt")
        with torch.no_grad():
            outputs.append((batch["grid_thws"], model(batch["pixel_values"], batch["grid_thws"])))
    (grid_1, out_1), (grid_2, out_2) = outputs
    assert torch.equal(grid_1, grid_2)  # one temporal patch (t = 1) per image either way
    torch.testing.assert_close(out_2.last_hidden_state, out_1.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_2.pooler_output, out_1.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", ["0", "-1", "1.5"])
def test_naflex_refuses_bad_temporal_patch_size(naflex_source, tmp_path, bad, capsys):
    folder, _ = naflex_source
    if bad == "1.5":  # argparse rejects it before the converter runs
        with pytest.raises(SystemExit):
            convert_siglip2_naflex.main([str(folder), str(tmp_path / "out"), "--temporal-patch-size", bad])
    else:
        assert convert_siglip2_naflex.main([str(folder), str(tmp_path / "out"), "--temporal-patch-size", bad]) == 1
        assert "temporal_patch_size must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_naflex_siglip2model_takes_only_the_vision_tower(tmp_path, monkeypatch):
    from transformers import Siglip2Config, Siglip2Model

    config = Siglip2Config(
        vision_config=_naflex_vision_config().to_dict(),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    )
    torch.manual_seed(1)
    source = Siglip2Model(config)
    src, dst = tmp_path / "siglip2", tmp_path / "navit"
    source.save_pretrained(src)
    recorder = _RecordingSafeOpen(safetensors_io.safe_open)
    monkeypatch.setattr(safetensors_io, "safe_open", recorder)
    convert_siglip2_naflex.convert(src, dst, hidden_stride=2)
    assert recorder.touched and all(k.startswith("vision_model.") for k in recorder.touched)

    model = AutoModel.from_pretrained(dst, trust_remote_code=True)
    ours = model.state_dict()
    theirs = {"vision_model." + k: v for k, v in source.vision_model.state_dict().items()}
    assert set(ours) == set(theirs)
    p = 16
    linear = theirs.pop("vision_model.embeddings.patch_embedding.weight")  # [D, p·p·C], (row, col, channel)
    conv = ours.pop("vision_model.embeddings.patch_embedding.weight")  # [D, C, p, p]
    for ch in range(3):
        for r in (0, 5, p - 1):
            for c in (0, 7, p - 1):
                assert torch.equal(conv[:, ch, r, c], linear[:, (r * p + c) * 3 + ch])
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_naflex_to_packed_layout():
    """Row layout: (channel, row, col) inside a patch, s×s-block order across patches; padding dropped."""
    p, c, h, w = 2, 3, 2, 4
    # value encodes (patch index, row-in-patch, col-in-patch, channel) in the naflex layout
    patches = torch.tensor(
        [[[n * 1000 + r * 100 + q * 10 + ch for r in range(p) for q in range(p) for ch in range(c)] for n in range(h * w)]],
        dtype=torch.float32,
    )
    padded = torch.cat([patches, torch.full((1, 3, p * p * c), -1.0)], dim=1)
    mask = torch.tensor([[1] * (h * w) + [0] * 3])
    rows, grid = convert_siglip2_naflex.naflex_to_packed(padded, mask, torch.tensor([[h, w]]), hidden_stride=2)
    assert grid.tolist() == [[1, h, w]]
    expected_patch_order = [0, 1, 4, 5, 2, 3, 6, 7]
    for k, n in enumerate(expected_patch_order):
        expected = [n * 1000 + r * 100 + q * 10 + ch for ch in range(c) for r in range(p) for q in range(p)]
        assert rows[k].tolist() == expected


def test_naflex_patch_order_both_ways():
    """Inside one patch: naflex flattens (row, col, channel), packed rows (channel, row, col); C != p here."""
    from siglip2_navit.navit_batching import naflex_patch_order

    p, c = 3, 2
    naflex = torch.tensor([r * 100 + q * 10 + ch for r in range(p) for q in range(p) for ch in range(c)])
    packed = torch.tensor([r * 100 + q * 10 + ch for ch in range(c) for r in range(p) for q in range(p)])
    order = naflex_patch_order(c, p)
    assert torch.equal(naflex[order], packed)
    assert torch.equal(packed[order.argsort()], naflex)


def test_naflex_to_packed_rejects_bad_inputs():
    pixels = torch.zeros(1, 6, 12)
    with pytest.raises(ValueError, match="not divisible by hidden_stride=2"):
        convert_siglip2_naflex.naflex_to_packed(pixels, torch.ones(1, 6), [[2, 3]], hidden_stride=2)
    with pytest.raises(ValueError, match="first h·w = 4 patches"):
        convert_siglip2_naflex.naflex_to_packed(pixels, torch.ones(1, 6), [[2, 2]])
    with pytest.raises(ValueError, match="not p·p·3"):
        convert_siglip2_naflex.naflex_to_packed(torch.zeros(1, 4, 10), torch.ones(1, 4), [[2, 2]])


def test_naflex_refuses_non_siglip2(tmp_path):
    src = tmp_path / "clip"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    save_file({"x": torch.zeros(1)}, str(src / "model.safetensors"))
    with pytest.raises(utils.ConversionError, match="model_type 'siglip'"):
        convert_siglip2_naflex.convert(src, tmp_path / "out")


def test_converted_config_loads_with_auto_config(naflex_source, tmp_path):
    folder, _ = naflex_source
    dst = convert_siglip2_naflex.convert(folder, tmp_path / "navit")
    config = AutoConfig.from_pretrained(dst, trust_remote_code=True)
    assert config.model_type == "siglip2_navit" and config.pe_antialias and not config.use_rope


# ----------------------------------------------------------------------------------------------------------------------
# malformed and hostile sources: one clear line, nothing read outside SRC, no NaN/Inf weights
# ----------------------------------------------------------------------------------------------------------------------


def _cli_error(capsys, src, dst, *extra):
    """Run the Ovis converter CLI, expecting failure; returns its one error line (after any progress bar)."""
    assert convert_ovis_checkpoint.main([str(src), str(dst), *extra]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    assert not dst.exists()
    return errors[0]


def test_truncated_shard_is_one_clear_error(tmp_path, capsys):
    src = tmp_path / "ovis"
    write_fake_ovis(src)
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    err = _cli_error(capsys, src, tmp_path / "vit")
    assert f"{shard} is not a valid safetensors file" in err


def test_pickle_renamed_safetensors_is_refused_unread(tmp_path, capsys, monkeypatch):
    src = tmp_path / "ovis"
    write_fake_ovis(src)
    shard = src / "model-00001-of-00002.safetensors"
    torch.save({"x": torch.zeros(2)}, shard)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    err = _cli_error(capsys, src, tmp_path / "vit")
    assert f"{shard} is not safetensors: it is a zip archive holding the pickle" in err


def _repoint_shard(src, shard_name):
    """Make the index list every tensor of the first shard under `shard_name`."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {
        key: shard_name if shard == "model-00001-of-00002.safetensors" else shard
        for key, shard in index["weight_map"].items()
    }
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_shards_must_stay_inside_src(tmp_path, capsys, monkeypatch, how):
    src = tmp_path / "ovis"
    write_fake_ovis(src)
    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    os.replace(src / "model-00001-of-00002.safetensors", outside)  # a valid shard, but outside SRC
    if how == "dotdot":
        _repoint_shard(src, "../elsewhere/model.safetensors")
    elif how == "absolute":
        _repoint_shard(src, str(outside))
    else:
        (src / "model-00001-of-00002.safetensors").symlink_to(outside)
    recorder = _RecordingSafeOpen(safetensors_io.safe_open)
    monkeypatch.setattr(safetensors_io, "safe_open", recorder)
    err = _cli_error(capsys, src, tmp_path / "vit")
    assert "outside" in err and "shards must be inside SRC" in err
    assert not recorder.touched


def test_hub_cache_snapshot_links_are_followed(tmp_path):
    """A Hugging Face cache snapshot's files are links into the cache repository's blobs/: accepted."""
    repo = tmp_path / "hub" / "models--AIDC-AI--Ovis2.5-9B"
    staging = tmp_path / "staging"
    write_fake_ovis(staging)
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(staging.iterdir())):
        os.replace(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    assert convert_ovis_checkpoint.main([str(snapshot), str(tmp_path / "vit")]) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_source_weights_are_refused(tmp_path, capsys, bad):
    src = tmp_path / "ovis"
    write_fake_ovis(src)
    shard = src / "model-00002-of-00002.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(shard)
    name = next(k for k in sorted(tensors) if k.startswith("visual_tokenizer.vit.") and tensors[k].numel() > 4)
    tensors[name].view(-1)[3] = bad
    save_file(tensors, str(shard), metadata={"format": "pt"})
    err = _cli_error(capsys, src, tmp_path / "vit")
    assert f"Tensor {name!r} in {shard} holds 1 non-finite value(s)" in err


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("extra", [[], ["--dtype", "float32"]])
def test_non_float_source_weights_are_refused(tmp_path, capsys, monkeypatch, dtype, extra):
    """An integer (or bool) weight would be stored as such and load as garbage, or be silently cast by --dtype:
    refused from the header, naming it, before any tensor data is read."""
    src = tmp_path / "ovis"
    write_fake_ovis(src, dtype=torch.float32)
    shard = src / "model-00002-of-00002.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(shard)
    name = next(k for k in sorted(tensors) if k.startswith("visual_tokenizer.vit.") and k.endswith(".weight"))
    tensors[name] = (tensors[name] * 100).to(dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    monkeypatch.setattr(safetensors_io.SafetensorsCheckpoint, "read", lambda *a, **k: pytest.fail("data read"))
    err = _cli_error(capsys, src, tmp_path / "vit", *extra)
    header_dtype = {torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}[dtype]
    assert f"Tensor {name!r} in {shard} is {header_dtype}" in err and "floating-point" in err


def test_cast_overflow_is_refused(tmp_path, capsys):
    src = tmp_path / "ovis"
    write_fake_ovis(src, dtype=torch.float32)
    shard = src / "model-00001-of-00002.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(shard)
    name = next(k for k in sorted(tensors) if k.startswith("visual_tokenizer.vit."))
    tensors[name] = tensors[name] * 1e6  # beyond float16's 65504
    save_file(tensors, str(shard), metadata={"format": "pt"})
    err = _cli_error(capsys, src, tmp_path / "vit", "--dtype", "float16")
    assert name.removeprefix("visual_tokenizer.vit.") in err and "exceed the range of float16" in err


def test_pickles_are_recognised_by_content_in_sources(tmp_path):
    src = tmp_path / "legacy"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "ovis2_5", "vit_config": VIT_CONFIG}))
    torch.save({"x": torch.zeros(1)}, src / "weights.npy")
    for convert in (convert_ovis_checkpoint.convert, convert_siglip2_naflex.convert):
        with pytest.raises(utils.ConversionError, match="pickle weights .*weights.npy.*safetensors"):
            convert(src, tmp_path / "out")


def _safetensors_with_header_length(path, length):
    """A valid safetensors file whose 8-byte header length is `length` (space-padded JSON header)."""
    header = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(length.to_bytes(8, "little") + header.ljust(length) + b"\0" * 8)


def test_pickle_sniffing_has_no_false_positives(tmp_path):
    """Files that start like a pickle by chance, or are compressed or archived non-pickles, are not pickles."""
    import gzip
    import zipfile

    import numpy as np
    from safetensors import safe_open

    # header length 0x380 -> the file starts with 0x80 0x03, a pickle's PROTO 3
    _safetensors_with_header_length(tmp_path / "a.safetensors", 0x380)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), torch.zeros(2))
    np.save(tmp_path / "floats.npy", np.zeros((3, 3), dtype=np.float32))
    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress(b"plain text " * 100))
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as archive:
        archive.writestr("config.json", "{}")
    for path in sorted(tmp_path.iterdir()) + sorted((ROOT / "examples").iterdir()):
        assert utils.pickle_reason(path) is None, path


# ----------------------------------------------------------------------------------------------------------------------
# --overwrite killed at every step: DST is the old or the new folder, or the next run puts the old one back
# ----------------------------------------------------------------------------------------------------------------------

OLD_FOLDER = {"model.safetensors": "old weights", "docs/card.md": "old card"}
NEW_FOLDER = {"model.safetensors": "new weights", "docs/card.md": "new card", "config.json": "{}"}


def _contents(folder: Path):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}


def _write_folder(folder: Path, files, tick=lambda: None):
    for name, text in files.items():
        tick()
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _overwrite_killed_at(dst: Path, kill_at: int, exchange: bool) -> bool:
    """In a forked child, replace `dst` with NEW_FOLDER and SIGKILL the child just before its `kill_at`-th step
    (writing a file, a rename, an exchange, a folder deletion (killed half-way)). True if the child was killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            steps = [0]

            def step():
                steps[0] += 1
                if steps[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            def counted(fn):
                return lambda *args, **kwargs: (step(), fn(*args, **kwargs))[1]

            real_rmtree = shutil.rmtree

            def rmtree(path, *args, **kwargs):
                if steps[0] + 1 == kill_at:  # killed after deleting part of the folder
                    next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
                step()
                return real_rmtree(path, *args, **kwargs)

            os.rename = counted(os.rename)
            shutil.rmtree = rmtree
            atomic._exchange = counted(atomic._exchange) if exchange else (lambda a, b: False)
            utils.atomic_write_folder(dst, lambda tmp: _write_folder(tmp, NEW_FOLDER, step), overwrite=True)
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, status
    return os.WIFSIGNALED(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_killed_at_every_step(tmp_path, exchange):
    if exchange:
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir(), b.mkdir()
        if not atomic._exchange(a, b):
            pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
        a.rmdir(), b.rmdir()
    kills = 0
    for kill_at in range(1, 50):
        base = tmp_path / str(kill_at)
        dst = base / "vit"
        base.mkdir()
        dst.mkdir()
        _write_folder(dst, OLD_FOLDER)
        killed = _overwrite_killed_at(dst, kill_at, exchange)
        if dst.exists():  # at every instant DST is one of the two complete folders ...
            assert _contents(dst) in (OLD_FOLDER, NEW_FOLDER), (kill_at, _contents(dst))
        else:  # ... or it was moved aside, and the next run puts the old one back
            assert killed and not exchange, kill_at
        utils.recover_interrupted(dst)
        expected = [OLD_FOLDER, NEW_FOLDER] if dst.exists() or not killed else [OLD_FOLDER]
        assert _contents(dst) in expected, (kill_at, _contents(dst))
        assert [p.name for p in base.iterdir()] == ["vit"], (kill_at, sorted(p.name for p in base.iterdir()))
        if not killed:
            assert _contents(dst) == NEW_FOLDER
            break
        kills += 1
    assert kills >= (6 if exchange else 7), kills  # 3 file writes, the swap, the deletion of the old folder, ...


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_killed_overwrite_is_undone_by_the_next_conversion(tmp_path, monkeypatch, capsys):
    """A real conversion killed between moving DST aside and moving the new folder in (two-rename fallback)."""
    src, dst = tmp_path / "ovis", tmp_path / "vit"
    write_fake_ovis(src)
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    pid = os.fork()
    if pid == 0:
        try:
            real_rename = os.rename
            os.rename = lambda a, b: (  # the second rename (new folder -> DST) never happens
                os.kill(os.getpid(), signal.SIGKILL) if Path(b) == dst.absolute() else real_rename(a, b)
            )
            atomic._exchange = lambda a, b: False
            convert_ovis_checkpoint.convert(src, dst, overwrite=True)
        finally:
            os._exit(3)
    os.waitpid(pid, 0)
    assert not dst.exists() and len([p for p in tmp_path.iterdir() if p.name.startswith(".vit.")]) == 2

    assert convert_ovis_checkpoint.main([str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "Restored" in err and "already exists; pass --overwrite" in err
    assert _contents(dst) == {"keep.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ovis", "vit"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_stale_temp_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    src, dst = tmp_path / "ovis", tmp_path / "vit"
    write_fake_ovis(src)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # `pid` is now a dead process
    dead = [tmp_path / f".vit.{kind}-{utils._HOST}-{pid}-a1b2c3d4" for kind in ("tmp", "old", "trash")]
    live = tmp_path / f".vit.tmp-{utils._HOST}-{os.getpid()}-e5f6g7h8"  # a concurrent conversion (this process)
    foreign = tmp_path / f".vit.tmp-another-host-{pid}-i9j0k1l2"  # whose owner cannot be checked from here
    for folder in (dst, *dead, live, foreign):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    assert convert_ovis_checkpoint.main([str(src), str(dst), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ovis", "vit", live.name, foreign.name])
    assert (dst / "config.json").is_file()


def test_naflex_refuses_a_vision_config_that_is_not_an_object(tmp_path):
    src = tmp_path / "naflex"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "siglip2", "vision_config": [1]}))
    save_file({"x": torch.zeros(1)}, str(src / "model.safetensors"))
    with pytest.raises(utils.ConversionError, match="vision config must be a JSON object"):
        convert_siglip2_naflex.convert(src, tmp_path / "out")


def test_overwrite_replaces_a_symlinked_destination_and_keeps_its_target(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep.txt").write_text("target")
    dst = tmp_path / "vit"
    dst.symlink_to(target)
    utils.atomic_write_folder(dst, lambda tmp: _write_folder(tmp, NEW_FOLDER), overwrite=True)
    assert not dst.is_symlink() and _contents(dst) == NEW_FOLDER
    assert _contents(target) == {"keep.txt": "target"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real", "vit"]
