# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""AIMv2 on the packed core (issue 13): the converted model against transformers' `Aimv2VisionModel`, and the
runtime features every packed family offers.

References are never this code's own output: transformers' `Aimv2VisionModel` (tiny, every parameter randomised) runs
image by image on real non-square photos resized and normalised here with PIL/numpy; the packed model gets the same
photos from the converted folder's image processor, several images per packed call. Mutation tests prove that the
agreement check catches the named broken variants (PE halves not swapped, attention leaking across images, block rows
read as raster).
"""

import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

from siglip2_navit.tools import convert_aimv2  # noqa: E402
from transformers import AutoImageProcessor, AutoModel  # noqa: E402


PHOTOS = ("chelsea.png", "rocket.jpg", "coffee.png", "horse.png")  # 451×300, 640×427, 600×400, 400×328
PATCH = 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=PATCH)
MIN_COSINE, MAX_RELATIVE = 0.9999, 1e-4  # the acceptance bounds (fp32)


# ----------------------------------------------------------------------------------------------------------------------
# helpers: randomised weights, photos, token orders, the agreement measure
# ----------------------------------------------------------------------------------------------------------------------


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the default init keeps norms at 1 and biases at 0, which hides bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "cls_token" in name or "position_embedding" in name:
                param.copy_(noise)  # the pooling query and the learned table: O(1) entries
            elif param.dim() > 1:
                param.copy_(noise / math.sqrt(param[0].numel()))  # fan-in scaled projections
            elif "norm" in name:
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_(0.3 * noise)  # biases
    return model


def transformers_aimv2(**overrides):
    """A tiny transformers `Aimv2VisionModel`, every parameter random (skips where transformers has no AIMv2)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Aimv2VisionModel"):
        pytest.skip(f"transformers {transformers.__version__} has no Aimv2VisionModel")
    values = dict(TINY, qkv_bias=True, mlp_bias=True, is_native=True)
    values.update(overrides)
    model = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**values))
    return randomize_(model).eval()


def convert_reference(reference, folder: Path, hidden_stride: int, attn_implementation: str = "sdpa"):
    """Save `reference`, convert it with scripts/convert_aimv2.py, load the result through the Auto API."""
    src = folder / "source"
    if not src.exists():
        reference.save_pretrained(src)
    dst = convert_aimv2.convert(src, folder / f"navit-s{hidden_stride}", hidden_stride=hidden_stride, overwrite=True)
    model = AutoModel.from_pretrained(dst, trust_remote_code=True, attn_implementation=attn_implementation)
    return dst, model.eval()


def block_order(h: int, w: int, s: int) -> List[int]:
    """Raster index of every token of an h×w grid in packed order (s×s blocks, raster inside), as nested loops."""
    return [(i * s + r) * w + (j * s + c) for i in range(h // s) for j in range(w // s) for r in range(s) for c in range(s)]


def reference_pixels(path: Path, grid_hw: Sequence[int]) -> torch.Tensor:
    """The photo as transformers gets it: PIL RGB, bicubic resize to the grid, /255, CLIP mean/std. [1, 3, H, W]."""
    h, w = grid_hw
    image = Image.open(path).convert("RGB").resize((w * PATCH, h * PATCH), resample=Image.Resampling.BICUBIC)
    array = (np.asarray(image, dtype=np.float64) / 255.0 - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(array.transpose(2, 0, 1)).float()[None]


def image_to_rows(image: torch.Tensor, s: int) -> torch.Tensor:
    """[1, C, H, W] -> packed rows [h·w, C·p·p] in packed order (the inverse of what a processor must produce)."""
    _, c, height, width = image.shape
    h, w = height // PATCH, width // PATCH
    raster = image[0].reshape(c, h, PATCH, w, PATCH).permute(1, 3, 0, 2, 4).reshape(h * w, c * PATCH * PATCH)
    return raster[torch.tensor(block_order(h, w, s))]


def processed_photos(folder: Path, names: Sequence[str] = PHOTOS, max_pixels: int = 140 * 140):
    """The photos through the converted folder's own image processor (small sizes), several in one packed batch."""
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    images = [Image.open(ROOT / "examples" / name) for name in names]
    batch = processor(images=images, min_pixels=56 * 56, max_pixels=max_pixels, return_tensors="pt")
    return batch["pixel_values"], batch["grid_thws"]


def _cosine_and_relative(ours: torch.Tensor, expected: torch.Tensor) -> tuple:
    cosine = F.cosine_similarity(ours.double(), expected.double(), dim=-1).min().item()
    relative = ((ours - expected).abs().max() / expected.abs().max()).item()
    return cosine, relative


def agreement(model, reference, pixel_values, grid_thws, names: Sequence[str] = PHOTOS) -> Dict[str, float]:
    """Min cosine and relative max-abs of patches and pooled: packed (one call) vs transformers (image by image)."""
    s = model.config.hidden_stride
    with torch.no_grad():
        out = model(pixel_values, grid_thws)
        expected_tokens, expected_pooled = [], []
        for name, (_, h, w) in zip(names, grid_thws.tolist()):
            ref = reference(reference_pixels(ROOT / "examples" / name, (h, w)))
            expected_tokens.append(ref.last_hidden_state[0][torch.tensor(block_order(h, w, s))])
            expected_pooled.append(ref.pooler_output[0])
    patches = _cosine_and_relative(out.last_hidden_state, torch.cat(expected_tokens))
    pooled = _cosine_and_relative(out.pooler_output, torch.stack(expected_pooled))
    return {"patch_cosine": patches[0], "patch_relative": patches[1], "pool_cosine": pooled[0], "pool_relative": pooled[1]}


def assert_agrees(stats: Dict[str, float]) -> None:
    for kind in ("patch", "pool"):
        assert stats[f"{kind}_cosine"] >= MIN_COSINE, stats
        assert stats[f"{kind}_relative"] <= MAX_RELATIVE, stats


def loaded_module(model, name: str):
    """The module `name` (e.g. "modeling_aimv2_navit", "navit_core") the remote-code `model` was loaded with."""
    return sys.modules[type(model).__module__.rsplit(".", 1)[0] + "." + name]


# ----------------------------------------------------------------------------------------------------------------------
# agreement with transformers' Aimv2VisionModel
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_reference():
    return transformers_aimv2()


@pytest.fixture(scope="module")
def converted(native_reference, tmp_path_factory):
    """hidden_stride -> (converted folder, model loaded from it, packed photos from its processor)."""
    base = tmp_path_factory.mktemp("aimv2")
    folders = {}
    for stride in (1, 2):
        dst, model = convert_reference(native_reference, base, stride)
        folders[stride] = (dst, model, processed_photos(dst))
    return folders


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("hidden_stride", [1, 2])
def test_converted_model_matches_transformers(converted, native_reference, hidden_stride, backend):
    _, model, (pixel_values, grid_thws) = converted[hidden_stride]
    grids = [(h, w) for _, h, w in grid_thws.tolist()]
    assert len(set(grids)) > 1 and all(h != w for h, w in grids), grids  # non-square photos, equal and unequal lengths
    model.set_attn_implementation(backend)
    try:
        stats = agreement(model, native_reference, pixel_values, grid_thws)
    finally:
        model.set_attn_implementation("sdpa")
    print(f"AIMv2 {backend} hidden_stride={hidden_stride}: {stats}")
    assert_agrees(stats)


def test_hidden_states_and_attention_maps_match_transformers(converted, native_reference):
    """Raster order (stride 1): embeddings + every layer's output equal transformers' hidden_states, and the eager
    per-image attention maps equal transformers' eager maps."""
    _, model, (pixel_values, grid_thws) = converted[1]
    model.set_attn_implementation("eager")
    native_reference.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(pixel_values, grid_thws, output_hidden_states=True, output_attentions=True)
            offset = 0
            for index, (name, (_, h, w)) in enumerate(zip(PHOTOS, grid_thws.tolist())):
                pixels = reference_pixels(ROOT / "examples" / name, (h, w))
                ref = native_reference(pixels, output_hidden_states=True, output_attentions=True)
                assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
                for ours, theirs in zip(out.hidden_states, ref.hidden_states):
                    torch.testing.assert_close(ours[offset : offset + h * w], theirs[0], rtol=1e-4, atol=1e-4)
                for layer_maps, theirs in zip(out.attentions, ref.attentions):
                    torch.testing.assert_close(layer_maps[index], theirs[0], rtol=1e-4, atol=1e-5)
                offset += h * w
    finally:
        model.set_attn_implementation("sdpa")
        native_reference.set_attn_implementation("sdpa")


def test_keep_indices_match_transformers_on_the_kept_tokens(converted, native_reference):
    """Token dropping (stride 2, whole blocks): each kept token keeps its (row, col) PE and attends only to the kept
    tokens of its image; the reference runs transformers' own embeddings, then its layers on the kept tokens only."""
    _, model, (pixel_values, grid_thws) = converted[2]
    keep = model.sample_keep_indices(grid_thws, 0.5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(pixel_values, grid_thws, keep_indices=keep)
        expected, expected_pooled, offset = [], [], 0
        for name, (_, h, w) in zip(PHOTOS, grid_thws.tolist()):
            order = torch.tensor(block_order(h, w, 2))
            mine = keep[(keep >= offset) & (keep < offset + h * w)] - offset  # kept rows of this image, block order
            offset += h * w
            embeddings = native_reference.embeddings(reference_pixels(ROOT / "examples" / name, (h, w)))
            hidden = native_reference.encoder(inputs_embeds=embeddings[:, order[mine]]).last_hidden_state
            hidden = native_reference.rms_norm(hidden)
            expected.append(hidden[0])
            expected_pooled.append(native_reference.head(hidden)[0])
    assert out.last_hidden_state.shape[0] == keep.numel() < pixel_values.shape[0]
    patches = _cosine_and_relative(out.last_hidden_state, torch.cat(expected))
    pooled = _cosine_and_relative(out.pooler_output, torch.stack(expected_pooled))
    assert patches[0] >= MIN_COSINE and patches[1] <= MAX_RELATIVE, patches
    assert pooled[0] >= MIN_COSINE and pooled[1] <= MAX_RELATIVE, pooled


def test_learned_position_table_is_exact_at_the_trained_grid_and_refuses_others(tmp_path):
    """Non-native checkpoints (`is_native=False`): the learned table matches transformers at its trained grid (4×4
    patches here); any other grid is a clear ValueError before compute."""
    reference = transformers_aimv2(is_native=False, image_size=4 * PATCH)
    _, model = convert_reference(reference, tmp_path, hidden_stride=2)
    pixels = [reference_pixels(ROOT / "examples" / name, (4, 4)) for name in PHOTOS[:3]]
    rows = torch.cat([image_to_rows(image, 2) for image in pixels])
    with torch.no_grad():
        out = model(rows, [[1, 4, 4]] * 3)
        refs = [reference(image) for image in pixels]
    order = torch.tensor(block_order(4, 4, 2))
    tokens = _cosine_and_relative(out.last_hidden_state, torch.cat([ref.last_hidden_state[0][order] for ref in refs]))
    pooled = _cosine_and_relative(out.pooler_output, torch.cat([ref.pooler_output for ref in refs]))
    assert_agrees({"patch_cosine": tokens[0], "patch_relative": tokens[1], "pool_cosine": pooled[0], "pool_relative": pooled[1]})
    with pytest.raises(ValueError, match=r"learned position table for a 4×4 patch grid.*frames \[1\].*\(4, 6\)"):
        model(torch.randn(16 + 24, 3 * PATCH * PATCH), [[1, 4, 4], [1, 4, 6]])


def test_sincos_position_embedding_is_the_spec_layout_in_float64():
    """AIMv2's 2D sin-cos position embedding, per token:
    [sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)], ω_k = 10000^(−k/(D/4)).
    Exact in float64, for positions up to the table's last row (a 5×9 grid, block order)."""
    from siglip2_navit.modeling_aimv2_navit import sincos_position_embeddings, sincos_table

    dim, h, w = 16, 5, 9
    positions = torch.tensor([[r, c] for r in range(h) for c in range(w)])[torch.randperm(h * w)]
    ours = sincos_position_embeddings(positions, sincos_table(max(h, w), dim, torch.device("cpu")))
    assert ours.dtype == torch.float64 and ours.shape == (h * w, dim)
    for (row, col), embedding in zip(positions.tolist(), ours):
        expected = []
        for coordinate in (col, row):
            angles = [coordinate * 10000.0 ** (-k / (dim // 4)) for k in range(dim // 4)]
            expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
        torch.testing.assert_close(embedding, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# mutation tests: the agreement check must catch each broken variant
# ----------------------------------------------------------------------------------------------------------------------


def test_agreement_catches_unswapped_position_embedding_halves(converted, native_reference, monkeypatch):
    """Row-first sin-cos (the usual layout, not AIMv2's swapped one) must fail the check."""
    _, model, (pixel_values, grid_thws) = converted[1]
    module = loaded_module(model, "modeling_aimv2_navit")
    swapped = module.sincos_position_embeddings
    monkeypatch.setattr(
        module, "sincos_position_embeddings", lambda positions, table: swapped(positions.flip(-1), table)  # row half first
    )
    with pytest.raises(AssertionError):
        assert_agrees(agreement(model, native_reference, pixel_values, grid_thws))


def test_agreement_catches_attention_leaking_across_images(converted, native_reference, monkeypatch):
    """One attention sequence over the whole packed batch (no cu_seqlens boundaries) must fail the check."""
    _, model, (pixel_values, grid_thws) = converted[1]
    layout_module = loaded_module(model, "navit_layout")
    plan = model.plan

    def leaky_plan(*args, **kwargs):
        layout = plan(*args, **kwargs)
        layout.full = layout_module._partition_of_lengths([layout.token_rows.shape[0]], layout.token_rows.device)
        return layout

    monkeypatch.setattr(model, "plan", leaky_plan)
    with pytest.raises(AssertionError):
        assert_agrees(agreement(model, native_reference, pixel_values, grid_thws))


def test_agreement_catches_block_rows_read_as_raster(converted, native_reference, monkeypatch):
    """Rows in 2×2-block order positioned as if they were raster must fail the check."""
    _, model, (pixel_values, grid_thws) = converted[2]
    monkeypatch.setattr(model.config, "hidden_stride", 1)
    with pytest.raises(AssertionError):
        assert_agrees(agreement(model, native_reference, pixel_values, grid_thws))


# ----------------------------------------------------------------------------------------------------------------------
# the model card's AIMv2 section
# ----------------------------------------------------------------------------------------------------------------------


def readme_folder(base: Path) -> str:
    """The README's `"path/to/aimv2-navit"`: a tiny random native AIMv2 checkpoint in transformers' layout (written
    without transformers' AIMv2 classes, so every transformers version builds it) converted by scripts/convert_aimv2.py."""
    from test_aimv2_convert import write_source

    src = base / "aimv2-source"
    write_source(src)
    return str(convert_aimv2.convert(src, base / "aimv2-navit", dtype="float32"))
