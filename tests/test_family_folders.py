# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Converted folders are true to their family: the folder's own processor and model (`AutoImageProcessor` +
`AutoModel`) reproduce the source pipeline (transformers' processor + model) on unseen images wherever the source's
preprocessing applies, and every folder ships a card of its own family whose code runs inside the folder and
prints what its comments say, plus the picture the card shows.

Sources are tiny random transformers checkpoints with every parameter randomised; expected values come from
transformers, never from this repository's code.
"""

import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from family_sources import convert_folder, push_validate, randomize_all
from siglip2_navit.tools.visualize import PICTURE_PATCHES
from test_resize_rules import pil_processor, sample_images  # photos, 1x1, 50x4000, 4000x50 (RGB)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
MIN_COSINE = 0.9999
Aimv2VisionModel = getattr(transformers, "Aimv2VisionModel", None)
DINOv3ViTModel = getattr(transformers, "DINOv3ViTModel", None)


def assert_close_features(ours: torch.Tensor, reference: torch.Tensor, what: str) -> float:
    cosine = F.cosine_similarity(ours.double(), reference.double(), dim=-1)
    assert cosine.min().item() >= MIN_COSINE, (what, cosine.min().item())
    return cosine.min().item()


def load_folder(folder: Path, **model_kwargs):
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, **model_kwargs).eval()
    return processor, model


# ----------------------------------------------------------------------------------------------------------------------
# SigLIP2 naflex
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def naflex_source(tmp_path_factory):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    config = Siglip2VisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
        num_patches=256, vision_use_head=True,
    )
    model = randomize_all(Siglip2VisionModel(config)).eval()
    folder = tmp_path_factory.mktemp("naflex") / "source"
    model.save_pretrained(folder)
    return folder, model


def test_naflex_folder_matches_transformers_pipeline(naflex_source, tmp_path):
    """AutoImageProcessor + AutoModel of the converted folder = Siglip2ImageProcessor + Siglip2VisionModel: same
    grids (`spatial_shapes`), tokens and pooled output at cosine >= 0.9999, for photos and extreme sizes."""
    src, reference = naflex_source
    dst = convert_folder("siglip2-naflex", src, tmp_path / "navit")
    processor, model = load_folder(dst)
    assert (processor.resize_rule, processor.max_num_patches, processor.hidden_stride) == ("naflex", 256, 1)

    images = sample_images()
    expected_inputs = pil_processor("Siglip2ImageProcessor")(patch_size=16, max_num_patches=256)(
        images, return_tensors="pt"
    )
    shapes = expected_inputs["spatial_shapes"].tolist()
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["grid_thws"].tolist() == [[1, h, w] for h, w in shapes]
    with torch.no_grad():
        expected = reference(**expected_inputs)
        out = model(**inputs)
    tokens = out.last_hidden_state.split([h * w for h, w in shapes])
    for i, (h, w) in enumerate(shapes):
        assert_close_features(tokens[i], expected.last_hidden_state[i, : h * w], f"tokens of image {i}")
    assert_close_features(out.pooler_output, expected.pooler_output, "pooled")


def test_naflex_folder_takes_the_source_processor_settings(naflex_source, tmp_path):
    src, _ = naflex_source
    source = tmp_path / "source"
    for item in src.iterdir():
        (source / item.name).parent.mkdir(parents=True, exist_ok=True)
        (source / item.name).write_bytes(item.read_bytes())
    settings = {"image_processor_type": "Siglip2ImageProcessor", "max_num_patches": 64, "patch_size": 16,
                "resample": 3, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]}
    (source / "preprocessor_config.json").write_text(json.dumps(settings))
    processor, _ = load_folder(convert_folder("siglip2-naflex", source, tmp_path / "navit"))
    assert (processor.max_num_patches, processor.resample) == (64, 3)
    assert (processor.image_mean, processor.image_std) == ([0.4, 0.5, 0.6], [0.2, 0.3, 0.25])


def test_naflex_stride_2_folder_makes_even_grids(naflex_source, tmp_path):
    """--hidden-stride 2: the naflex rule on 2x2 blocks, so ordinary photos (odd naflex grids) encode."""
    src, _ = naflex_source
    processor, model = load_folder(convert_folder("siglip2-naflex", src, tmp_path / "navit", hidden_stride=2))
    assert (processor.resize_rule, processor.hidden_stride) == ("naflex", 2)
    inputs = processor(images=sample_images(), return_tensors="pt")
    grids = inputs["grid_thws"][:, 1:]
    assert bool((grids % 2 == 0).all()) and bool((grids.prod(-1) <= 256).all())
    with torch.no_grad():
        assert model(**inputs).last_hidden_state.shape[0] == int(inputs["grid_thws"].prod(-1).sum())


# ----------------------------------------------------------------------------------------------------------------------
# AIMv2
# ----------------------------------------------------------------------------------------------------------------------

needs_aimv2 = pytest.mark.skipif(Aimv2VisionModel is None, reason="transformers has no Aimv2VisionModel")
CLIP_SETTINGS = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def aimv2_source(folder: Path, is_native: bool, size: int = 56):
    config = transformers.Aimv2VisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
        image_size=size, is_native=is_native, use_head=True,
    )
    model = randomize_all(Aimv2VisionModel(config)).eval()
    model.save_pretrained(folder)
    return model


@needs_aimv2
def test_aimv2_fixed_size_folder_matches_clip_pipeline(tmp_path):
    """is_native=False (a learned table for one grid): the folder resizes and crops like the source's CLIP
    processor, so any image works and features equal Aimv2VisionModel on CLIPImageProcessor's output."""
    src = tmp_path / "source"
    reference = aimv2_source(src, is_native=False)
    clip = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 56},
            "crop_size": {"height": 56, "width": 56}, "do_center_crop": True, "resample": 3, **CLIP_SETTINGS}
    (src / "preprocessor_config.json").write_text(json.dumps(clip))
    dst = convert_folder("aimv2", src, tmp_path / "navit")
    processor, model = load_folder(dst)
    assert (processor.resize_rule, processor.shortest_edge, processor.crop_size) == ("center_crop", 56, [56, 56])

    images = sample_images()
    expected_inputs = pil_processor("CLIPImageProcessor")(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, resample=3, **CLIP_SETTINGS
    )(images, return_tensors="pt")
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["grid_thws"].tolist() == [[1, 4, 4]] * len(images)
    with torch.no_grad():
        expected = reference(**expected_inputs)
        out = model(**inputs)
    assert_close_features(out.last_hidden_state, expected.last_hidden_state.flatten(0, 1), "tokens")
    assert_close_features(out.pooler_output, expected.pooler_output, "pooled")
    push_validate(dst)  # the dry run of publishing loads and runs the folder on a sample photo


@needs_aimv2
def test_aimv2_fixed_size_refuses_a_crop_its_table_cannot_take(tmp_path):
    src = tmp_path / "source"
    aimv2_source(src, is_native=False)
    (src / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 64}, "crop_size": 42}))
    with pytest.raises(Exception, match="crop"):
        convert_folder("aimv2", src, tmp_path / "navit")
    assert not (tmp_path / "navit").exists()


def normalised(image: Image.Image, mean, std) -> torch.Tensor:
    """`[1, 3, H, W]` float32: uint8 RGB / 255, then (x - mean) / std, in float64 (the source processors' math)."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).double() / 255
    mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return ((pixels - mean[:, None, None]) / std[:, None, None])[None].float()


@needs_aimv2
def test_aimv2_native_folder_keeps_native_resolution(tmp_path):
    """is_native=True: the folder keeps each image's aspect ratio (Ovis pixel budget, stride 1 = raster order), and
    on the image it resizes to, folder processor + model equal Aimv2VisionModel run on that image alone."""
    src = tmp_path / "source"
    reference = aimv2_source(src, is_native=True)
    processor, model = load_folder(convert_folder("aimv2", src, tmp_path / "navit"))
    assert (processor.resize_rule, processor.hidden_stride) == ("ovis", 1)
    photos = sample_images()[:3]
    grids = processor(images=photos, return_tensors="pt")["grid_thws"].tolist()
    assert len({tuple(g) for g in grids}) == 3  # each photo its own aspect ratio

    small = [photo.resize((photo.width // 8 // 14 * 14, photo.height // 8 // 14 * 14), Image.Resampling.BILINEAR)
             for photo in photos]  # native sizes, whole 14-px patches, kept small for the test
    inputs = processor(images=small, do_resize=False, return_tensors="pt")
    assert inputs["grid_thws"].tolist() == [[1, s.height // 14, s.width // 14] for s in small]
    with torch.no_grad():
        out = model(**inputs)
        expected = [reference(pixel_values=normalised(s, processor.image_mean, processor.image_std)) for s in small]
    counts = inputs["grid_thws"].prod(-1).tolist()
    for tokens, e in zip(out.last_hidden_state.split(counts), expected):
        assert_close_features(tokens, e.last_hidden_state[0], "tokens")
    assert_close_features(out.pooler_output, torch.cat([e.pooler_output for e in expected]), "pooled")


# ----------------------------------------------------------------------------------------------------------------------
# DINOv3
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(DINOv3ViTModel is None, reason="transformers has no DINOv3ViTModel")
def test_dinov3_folder_equals_source_pipeline_on_the_source_size(tmp_path):
    """The source resizes to 224x224; the folder keeps native resolution (documented in its card). Given the
    source's 224x224 image (`do_resize=False`), folder processor + model equal the source pipeline."""
    config = transformers.DINOv3ViTConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
        num_register_tokens=2,
    )
    reference = randomize_all(DINOv3ViTModel(config)).eval()
    src = tmp_path / "source"
    reference.save_pretrained(src)
    dst = convert_folder("dinov3", src, tmp_path / "navit")
    processor, model = load_folder(dst)
    card = (dst / "README.md").read_text()
    assert "224×224" in card and "native resolution" in card

    photos = sample_images()[:3]
    square = [image.resize((224, 224), resample=Image.Resampling.BILINEAR) for image in photos]
    source_pixels = torch.cat(  # the source pipeline: 224x224 bilinear, rescale, ImageNet normalisation
        [normalised(s, processor.image_mean, processor.image_std) for s in square]
    )
    inputs = processor(images=square, do_resize=False, return_tensors="pt")
    with torch.no_grad():
        expected = reference(pixel_values=source_pixels)
        out = model(**inputs)
    prefix = 1 + config.num_register_tokens
    assert_close_features(out.pooler_output, expected.last_hidden_state[:, 0], "CLS")
    assert_close_features(out.last_hidden_state, expected.last_hidden_state[:, prefix:].flatten(0, 1), "patches")


# ----------------------------------------------------------------------------------------------------------------------
# cards and pictures
# ----------------------------------------------------------------------------------------------------------------------

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
PRINTED = re.compile(r"^print\(.*\)  # (.*)$", re.M)


def run_card_blocks(folder: Path, monkeypatch) -> int:
    """Run every Python block of `folder/README.md` from inside the folder (placeholder -> the folder) and check that
    each `print` line prints exactly its comment; returns the number of blocks run."""
    card = (folder / "README.md").read_text(encoding="utf-8")
    blocks = [code for lang, code in FENCE.findall(card) if lang == "python"]
    monkeypatch.chdir(folder)
    for code in blocks:
        expected = PRINTED.findall(code)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(code.replace("path/or/hub-id", str(folder)), f"{folder.name}/README.md", "exec"), {})
        assert stdout.getvalue().splitlines() == expected, code
    return len(blocks)


FAMILY_WORDS = {"siglip2-naflex": "SigLIP2 naflex", "ovis": "Ovis2.5", "aimv2": "AIMv2", "dinov3": "DINOv3"}


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory, naflex_source):
    """One converted folder per kind: Ovis2.5, naflex stride 1 and 2, AIMv2 native and fixed-size, DINOv3."""
    from family_sources import write_family_sources

    base = tmp_path_factory.mktemp("cards")
    folders = {}
    for name, (family, src, options) in write_family_sources(base, naflex_source[0]).items():
        folders[name] = (family, convert_folder(family, src, base / name, **options))
    return folders


def test_cards_describe_their_own_folder(family_folders):
    for name, (family, folder) in family_folders.items():
        card = (folder / "README.md").read_text(encoding="utf-8")
        config = json.loads((folder / "config.json").read_text())
        assert FAMILY_WORDS[family] in card.split("\n# ", 1)[1].split("\n", 1)[0], name  # the title names the family
        for field, value in (("width (hidden size)", config["hidden_size"]), ("layers", config["num_hidden_layers"]),
                             ("attention heads", config["num_attention_heads"])):
            assert f"| {field} | {value} |" in card, (name, field)
        assert f"| patch | {config['patch_size']}×{config['patch_size']} px" in card
        if family == "dinov3":
            assert f"| register tokens | {config['num_register_tokens']} |" in card
        assert "| pooling head |" in card and f"with `navit-convert {family}`" in card, name  # head; how it was made
        source = {"ovis": "ovis-source", "naflex": "source", "naflex-stride2": "source"}.get(name, f"{name}-source")
        assert f"Weights converted from `{source}`" in card, name  # names its source
        assert "scripts/" not in card and "SPEC" not in card and "python scripts" not in card, name
        assert re.findall(r"`(navit-[a-z]+)", card) and set(re.findall(r"\b(navit-[a-z]+) ", card)) <= {
            "navit-convert", "navit-visualize", "navit-encode", "navit-push", "navit-benchmark"}
        pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
        assert pictures and all((folder / p).is_file() for p in pictures), name
        assert any(p.endswith(".features.png") for p in pictures)
        for picture in pictures:  # within the card picture's patch budget (the eager attention maps stay small)
            with Image.open(folder / picture) as image:
                width, height = image.size
            assert width * height <= PICTURE_PATCHES * config["patch_size"] ** 2, (name, picture, image.size)
        has_query = family != "ovis"  # a CLS token (DINOv3) or a pooling head (naflex MAP, AIMv2 attention pooling)
        assert any(p.endswith(".attention.png") for p in pictures) == has_query, name
        assert RULE_WORDS[name] in card.split("## Preprocessing", 1)[1].split("\n## ", 1)[0], name
        outputs = card.split("Outputs:", 1)[1].split("\n\n", 2)[1]
        assert OUTPUT_WORDS[family] in outputs, name


# What each family's outputs mean (the tiny DINOv3 source has 2 registers: CLS + 2 prefix tokens per frame).
OUTPUT_WORDS = {
    "ovis": "`pooler_output` is `None` (no pooling head)",
    "siglip2-naflex": "`pooler_output` `[images, hidden]`: the MAP (multi-head attention pooling probe)",
    "aimv2": "`pooler_output` `[images, hidden]`: the attention pooling (a learned query over all tokens)",
    "dinov3": "`prefix_tokens` `[frames, 3, hidden]`: the CLS token and the 2 register tokens",
}


# What each kind's "Preprocessing" section must state (the tiny sources: naflex 256 patches; AIMv2 224-style crop of
# 56 px; DINOv3's 224x224 source rule next to the folder's native resolution).
RULE_WORDS = {
    "ovis": "Ovis2.5's `smart_resize`",
    "naflex": "at most **256 patches** of 16 px",
    "naflex-stride2": "runs on 2×2 blocks of patches",
    "aimv2-native": "Ovis2.5's `smart_resize`",
    "aimv2-224": "centred **56×56** window",
    "dinov3": "squeezes every image to 224×224",
}


def test_readme_states_the_naflex_folder_values(family_folders):
    """README's quick start prints an Ovis2.5 folder's values and states what a naflex folder gives instead: those
    numbers are the naflex folder's (and transformers' `spatial_shapes`)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    claim = re.search(r"naflex folder, for example, sizes both\s+images to (\d+)×(\d+) patches.*?(\d+) rows in all",
                      readme, re.S)
    assert claim, "README no longer states the naflex folder's values"
    h, w, rows = (int(v) for v in claim.groups())
    root = Path(__file__).resolve().parent.parent / "examples"
    images = [Image.open(root / name) for name in ("chelsea.png", "rocket.jpg")]
    processor = AutoImageProcessor.from_pretrained(family_folders["naflex"][1], trust_remote_code=True)
    grids = processor(images=images, return_tensors="pt")["grid_thws"].tolist()
    naflex = pil_processor("Siglip2ImageProcessor")(patch_size=16, max_num_patches=256)
    expected = naflex(images, return_tensors="pt")["spatial_shapes"].tolist()
    assert grids == [[1, h, w]] * 2 == [[1, *shape] for shape in expected]
    assert rows == 2 * h * w


# (resize_rule, hidden_stride) of each kind's processor: the source's preprocessing; the Ovis rule where the source
# keeps native resolution (Ovis2.5, native AIMv2) or where the folder deliberately does (DINOv3, documented in its card).
FOLDER_RULES = {
    "ovis": ("ovis", 2), "naflex": ("naflex", 1), "naflex-stride2": ("naflex", 2), "aimv2-native": ("ovis", 1),
    "aimv2-224": ("center_crop", 1), "dinov3": ("ovis", 1),
}


def test_each_folder_kind_gets_its_sources_resize_rule(family_folders):
    for name, (_, folder) in family_folders.items():
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert (processor.resize_rule, processor.hidden_stride) == FOLDER_RULES[name], name


def test_card_code_runs_inside_each_folder_and_prints_its_values(family_folders, monkeypatch):
    for name, (_, folder) in family_folders.items():
        assert run_card_blocks(folder, monkeypatch) >= 2, name
