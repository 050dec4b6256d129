# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""DINOv3 on the packed core (issue 13): converted `Dinov3NavitModel` vs transformers' `DINOv3ViTModel`.

Sources are tiny random transformers checkpoints built here, every parameter randomised (the default init keeps norms
at 1, biases at 0, layer scales constant and attention nearly uniform, which would hide bugs). Expected values come
from transformers run image by image on real non-square photos (`examples/`), never from this model's own output; the
pixels transformers sees are rebuilt from the packed rows with the packed order written out in this file. Deliberately
broken variants of the model (monkeypatched) must fail the same agreement check.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from siglip2_navit import modeling_dinov3_navit as modeling
from siglip2_navit import navit_core as core
from siglip2_navit import navit_layout
from siglip2_navit.configuration_dinov3_navit import Dinov3NavitConfig
from siglip2_navit.modeling_dinov3_navit import Dinov3NavitModel


os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

from siglip2_navit.tools import checkpoint_utils as utils  # noqa: E402
from siglip2_navit.tools import convert_dinov3  # noqa: E402
from transformers import AutoImageProcessor, AutoModel  # noqa: E402


DINOv3ViTModel = getattr(transformers, "DINOv3ViTModel", None)
needs_reference = pytest.mark.skipif(
    DINOv3ViTModel is None, reason=f"transformers {transformers.__version__} has no DINOv3ViTModel (added in 4.56)"
)

PATCH = 4
PHOTOS = ("chelsea.png", "rocket.jpg", "coffee.png", "horse.png")  # 451x300, 640x427, 600x400, 400x328
PIXELS = dict(min_pixels=24 * 24, max_pixels=56 * 56)  # about 100-200 patches of 4 px per photo
MIN_COSINE, MAX_RELATIVE = 0.9999, 1e-4
BASE = dict(  # transformers' DINOv3ViTConfig field names; registers and every augmentation on
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=PATCH,
    num_register_tokens=2,
    pos_embed_shift=0.2,
    pos_embed_jitter=1.3,
    pos_embed_rescale=1.6,
)
GATED = dict(BASE, num_register_tokens=0, use_gated_mlp=True, hidden_act="silu", key_bias=True, mlp_bias=False)
SOURCE_NORMALISATION = {"image_mean": [0.3, 0.5, 0.4], "image_std": [0.2, 0.3, 0.25], "resample": 3}


# ----------------------------------------------------------------------------------------------------------------------
# sources, randomised; the packed token order written out independently of the model code
# ----------------------------------------------------------------------------------------------------------------------


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value away from its init (norms, biases, layer scales and tokens included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("lambda1"):
                param.copy_(0.6 + 0.3 * noise)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            elif param.dim() >= 2 and "token" not in name:
                param.copy_(1.5 * noise / math.sqrt(param[0].numel()))  # sharp attention: RoPE errors show
            else:  # cls / register / mask tokens
                param.copy_(noise)
    return model


def write_source(folder: Path, seed: int = 0, normalisation: Optional[dict] = None, **config) -> Path:
    """A transformers `DINOv3ViTModel` folder (random weights); where this transformers lacks DINOv3, the same files
    written by hand (tensor names as transformers saves them, `model_type` dinov3_vit)."""
    if DINOv3ViTModel is not None:
        model = randomize_(DINOv3ViTModel(transformers.DINOv3ViTConfig(**config)), seed)
        model.save_pretrained(folder)
    else:
        state = randomize_(Dinov3NavitModel(Dinov3NavitConfig(**config)), seed).state_dict()
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "dinov3_vit", **config}))
    if normalisation is not None:
        processor = {"image_processor_type": "DINOv3ViTImageProcessorFast", "size": {"height": 224, "width": 224}}
        (folder / "preprocessor_config.json").write_text(json.dumps({**processor, **normalisation}))
    return folder


def block_order(h: int, w: int, s: int) -> List[Tuple[int, int]]:
    """(row, col) of every packed row of an h×w frame: s×s blocks in raster order, raster order inside."""
    return [(i * s + r, j * s + c) for i in range(h // s) for j in range(w // s) for r in range(s) for c in range(s)]


def raster_index(h: int, w: int, s: int) -> torch.Tensor:
    """Raster index of every packed row: reorders transformers' raster tokens into the packed order."""
    return torch.tensor([r * w + c for r, c in block_order(h, w, s)])


def to_image(rows: torch.Tensor, h: int, w: int, s: int) -> torch.Tensor:
    """Packed rows [h·w, C·p·p] of one frame -> the image [1, C, h·p, w·p] transformers takes."""
    image = torch.empty(3, h * PATCH, w * PATCH)
    for row, (r, c) in zip(rows, block_order(h, w, s)):
        image[:, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = row.view(3, PATCH, PATCH)
    return image[None]


def photos() -> List[Image.Image]:
    return [Image.open(ROOT / "examples" / name).convert("RGB") for name in PHOTOS]


def packed_photos(folder: Path):
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    batch = processor(photos(), return_tensors="pt", **PIXELS)
    grids = batch["grid_thws"].tolist()
    assert all(h != w for _, h, w in grids), "the photos must give non-square grids"
    return batch["pixel_values"], batch["grid_thws"]


def per_image(pixel_values: torch.Tensor, grids: torch.Tensor, stride: int):
    """(image tensor, h, w, rows slice) of every image of a packed batch (t = 1)."""
    start = 0
    for _, h, w in grids.tolist():
        rows = slice(start, start + h * w)
        yield to_image(pixel_values[rows], h, w, stride), h, w, rows
        start += h * w


# ----------------------------------------------------------------------------------------------------------------------
# the agreement check
# ----------------------------------------------------------------------------------------------------------------------


def agreement(ours: torch.Tensor, reference: torch.Tensor) -> Tuple[float, float]:
    """(min cosine over rows, max |difference| / max |reference|), in float64."""
    ours, reference = ours.double().flatten(0, -2), reference.double().flatten(0, -2)
    cosine = F.cosine_similarity(ours, reference, dim=-1).min().item()
    return cosine, ((ours - reference).abs().max() / reference.abs().max()).item()


def check_agreement(stats: Dict[str, Tuple[float, float]]) -> None:
    for what, (cosine, relative) in stats.items():
        assert cosine >= MIN_COSINE and relative <= MAX_RELATIVE, f"{what}: min cosine {cosine}, relative {relative}"


def report(label: str, stats: Dict[str, Tuple[float, float]]) -> None:
    """Print the measured agreement (pytest -s shows it)."""
    summary = ", ".join(f"{what} 1-cos {1 - cos:.1e} rel {rel:.1e}" for what, (cos, rel) in stats.items())
    print(f"\nDINOv3 {label}: {summary}")


def reference_outputs(reference, pixel_values, grids, stride, **kwargs):
    """transformers run image by image: patches (packed order), CLS and prefix tokens, concatenated over images."""
    patches, pooled, prefix = [], [], []
    num_prefix = 1 + reference.config.num_register_tokens
    with torch.no_grad():
        for image, h, w, _ in per_image(pixel_values, grids, stride):
            out = reference(image, **kwargs)
            patches.append(out.last_hidden_state[0, num_prefix:][raster_index(h, w, stride)])
            pooled.append(out.pooler_output[0])
            prefix.append(out.last_hidden_state[0, :num_prefix])
    return torch.cat(patches), torch.stack(pooled), torch.stack(prefix)


def compare(model, reference, pixel_values, grids, stride) -> Dict[str, Tuple[float, float]]:
    with torch.no_grad():
        out = model(pixel_values, grids)
    patches, pooled, prefix = reference_outputs(reference, pixel_values, grids, stride)
    return {
        "patches": agreement(out.last_hidden_state, patches),
        "pooled": agreement(out.pooler_output, pooled),
        "prefix": agreement(out.prefix_tokens, prefix),
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("dinov3-sources")
    return {
        "base": write_source(base / "base", seed=1, normalisation=SOURCE_NORMALISATION, **BASE),
        "gated": write_source(base / "gated", seed=2, **GATED),
    }


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """Converted folders, by (source, hidden_stride)."""
    base = tmp_path_factory.mktemp("dinov3-converted")
    return {
        (name, stride): convert_dinov3.convert(sources[name], base / f"{name}-s{stride}", hidden_stride=stride)
        for name in ("base", "gated")
        for stride in (1, 2)
    }


def load_reference(folder: Path, attn: str = "sdpa"):
    return DINOv3ViTModel.from_pretrained(folder, attn_implementation=attn).eval()


# ----------------------------------------------------------------------------------------------------------------------
# agreement with transformers
# ----------------------------------------------------------------------------------------------------------------------


@needs_reference
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("stride", [1, 2])
def test_converted_model_matches_transformers(sources, converted, stride, attn):
    """Four photos in one packed call vs transformers image by image: patches, CLS and prefix tokens."""
    folder = converted[("base", stride)]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation=attn).eval()
    assert type(model).__name__ == "Dinov3NavitModel" and model.config._attn_implementation == attn
    pixel_values, grids = packed_photos(folder)
    stats = compare(model, load_reference(sources["base"], attn), pixel_values, grids, stride)
    report(f"stride={stride} {attn}", stats)
    check_agreement(stats)


@needs_reference
def test_gated_mlp_without_registers_matches_transformers(sources, converted):
    folder = converted[("gated", 2)]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    pixel_values, grids = packed_photos(folder)
    stats = compare(model, load_reference(sources["gated"]), pixel_values, grids, 2)
    report("gated MLP, no registers, stride=2 sdpa", stats)
    check_agreement(stats)


def _longer_side(original):
    return lambda positions, grid_sizes: original(positions, grid_sizes.amax(-1, keepdim=True).expand_as(grid_sizes))


def _leaky(original):
    def attention(module, query, key, value, partition, *args, **kwargs):
        one_sequence = navit_layout._partition_of_lengths([query.shape[0]], query.device)
        return original(module, query, key, value, one_sequence, *args, **kwargs)

    return attention


def _rotated_prefix(num_prefix, head_dim, device):
    return modeling.rope_cos_sin(torch.full((num_prefix, 2), -0.75, device=device), head_dim, 100.0)


def _as_raster(original):
    return lambda grids, stride, window_blocks: original(grids, 1, window_blocks)


MUTATIONS = {
    "rope normalised by the longer side": (modeling, "patch_coordinates", _longer_side(modeling.patch_coordinates)),
    "block rows passed as raster": (navit_layout, "_token_coordinates", _as_raster(navit_layout._token_coordinates)),
    "prefix tokens rotated": (modeling, "prefix_rotation", _rotated_prefix),
}


@needs_reference
@pytest.mark.parametrize("mutation", [*MUTATIONS, "attention leaking across images"])
def test_agreement_check_catches_broken_variants(sources, converted, mutation, monkeypatch):
    folder = converted[("base", 2)]
    model = Dinov3NavitModel.from_pretrained(folder).eval()
    pixel_values, grids = packed_photos(folder)
    reference = load_reference(sources["base"])
    check_agreement(compare(model, reference, pixel_values, grids, 2))  # the intact model passes
    if mutation in MUTATIONS:
        monkeypatch.setattr(*MUTATIONS[mutation])
    else:
        monkeypatch.setitem(core.PACKED_ATTENTION_FUNCTIONS, "sdpa", _leaky(core.sdpa_packed_attention))
    with pytest.raises(AssertionError):
        check_agreement(compare(model, reference, pixel_values, grids, 2))


@needs_reference
def test_hidden_states_and_attention_maps_match_transformers(sources, converted):
    """output_hidden_states: the patch rows of every layer (embeddings first); output_attentions (eager): per-frame
    maps over [CLS, registers, patches] in input order, as transformers' maps of each image."""
    folder = converted[("base", 1)]
    model = Dinov3NavitModel.from_pretrained(folder, attn_implementation="eager").eval()
    reference = load_reference(sources["base"], "eager")
    pixel_values, grids = packed_photos(folder)
    with torch.no_grad():
        out = model(pixel_values, grids, output_hidden_states=True, output_attentions=True)
        assert len(out.hidden_states) == len(out.attentions) + 1 == 3
        for i, (image, h, w, rows) in enumerate(per_image(pixel_values, grids, 1)):
            expected = reference(image, output_hidden_states=True, output_attentions=True)
            for ours, theirs in zip(out.hidden_states, expected.hidden_states):
                check_agreement({"hidden": agreement(ours[rows], theirs[0, 3:])})
            for ours, theirs in zip(out.attentions, expected.attentions):
                assert ours[i].shape == theirs[0].shape == (2, 3 + h * w, 3 + h * w)
                torch.testing.assert_close(ours[i], theirs[0], atol=1e-5, rtol=1e-4)


@needs_reference
def test_keep_indices_match_transformers_on_the_kept_tokens(sources, converted):
    """Token dropping: the kept patches (with their true positions) and every prefix token, as transformers'
    encoder run on exactly those tokens with their RoPE rows."""
    folder = converted[("base", 2)]
    model = Dinov3NavitModel.from_pretrained(folder).eval()
    reference = load_reference(sources["base"])
    pixel_values, grids = packed_photos(folder)
    keep = model.sample_keep_indices(grids, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(pixel_values, grids, keep_indices=keep)
        assert out.prefix_tokens.shape == (4, 3, 32) and out.last_hidden_state.shape == (len(keep), 32)
        patches, pooled = [], []
        for image, h, w, rows in per_image(pixel_values, grids, 2):
            local = keep[(keep >= rows.start) & (keep < rows.stop)] - rows.start  # packed rows of this image
            tokens = torch.cat([torch.arange(3), 3 + raster_index(h, w, 2)[local]])
            cos, sin = reference.rope_embeddings(image)
            rope = (cos[tokens[3:] - 3], sin[tokens[3:] - 3])  # the kept patches' rows
            hidden = reference.embeddings(image)[:, tokens]
            for layer in getattr(reference, "model", reference).layer:  # transformers 4.x: `layer`; 5.x: `model.layer`
                hidden = layer(hidden, position_embeddings=rope)
            normed = reference.norm(hidden)[0]
            patches.append(normed[3:])
            pooled.append(normed[0])
    check_agreement({"patches": agreement(out.last_hidden_state, torch.cat(patches))})
    check_agreement({"pooled": agreement(out.pooler_output, torch.stack(pooled))})


@needs_reference
def test_bool_masked_pos_matches_transformers(sources, converted):
    folder = converted[("base", 1)]
    model = Dinov3NavitModel.from_pretrained(folder).eval()
    reference = load_reference(sources["base"])
    pixel_values, grids = packed_photos(folder)
    masked = torch.rand(pixel_values.shape[0], generator=torch.Generator().manual_seed(0)) < 0.3
    with torch.no_grad():
        out = model(pixel_values, grids, bool_masked_pos=masked)
        expected = [
            reference(image, bool_masked_pos=masked[rows][None]).last_hidden_state[0, 3:]
            for image, h, w, rows in per_image(pixel_values, grids, 1)
        ]
    check_agreement({"masked": agreement(out.last_hidden_state, torch.cat(expected))})


@needs_reference
def test_train_mode_rope_augmentation_matches_transformers_seeded(sources, converted):
    """Train mode: the same RoPE augmentation draws as transformers run image by image from the same seed (one
    shift / jitter / rescale draw per image); eval mode applies none."""
    folder = converted[("base", 1)]
    model = Dinov3NavitModel.from_pretrained(folder).train()
    reference = load_reference(sources["base"]).train()
    pixel_values, grids = packed_photos(folder)
    with torch.no_grad():
        torch.manual_seed(7)
        trained = model(pixel_values, grids)
        torch.manual_seed(7)
        patches, pooled, _ = reference_outputs(reference, pixel_values, grids, 1)
        evaluated = model.eval()(pixel_values, grids)
    check_agreement({"patches": agreement(trained.last_hidden_state, patches)})
    check_agreement({"pooled": agreement(trained.pooler_output, pooled)})
    assert agreement(evaluated.last_hidden_state, patches)[0] < 0.999  # the augmentation did change the result
    reference.eval()
    check_agreement(compare(model, reference, pixel_values, grids, 1))


def _ks_uniform(samples: torch.Tensor, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between `samples` and U(low, high)."""
    ordered = ((samples.double().sort().values - low) / (high - low)).clamp(0, 1)
    n = ordered.numel()
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((upper - ordered).abs().max().item(), (ordered - (upper - 1 / n)).abs().max().item())


def test_rope_augmentation_distribution_per_image():
    """Per image: shift ~ U(−s, s) per axis, jitter log-uniform in [1/j, j] per axis, rescale log-uniform in [1/r, r]
    shared by both axes; frames of one image share the draw. Recovered from the augmented coordinates of the points
    (0, 0) and (1, 1) of every image (KS distance < 0.035 over 4000 images)."""
    n = 4000
    config = Dinov3NavitConfig(hidden_size=32, num_attention_heads=2, pos_embed_shift=0.3, pos_embed_jitter=1.5)
    plan = modeling.Dinov3Plan(image_ids=torch.arange(n).repeat_interleave(2), num_images=n)
    coords = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(n, 1)
    torch.manual_seed(0)
    out = modeling.augment_coordinates(coords, plan, config).view(n, 2, 2)
    scale = out[:, 1] - out[:, 0]  # jitter · rescale per axis
    shift = out[:, 0] / scale
    log_jitter_ratio = scale[:, 0].log() - scale[:, 1].log()  # rescale cancels
    assert _ks_uniform(shift.flatten(), -0.3, 0.3) < 0.035
    # log scale = log jitter + log rescale: their difference across axes is a difference of two U(−a, a): triangular
    a = math.log(1.5)
    triangular_cdf = lambda x: torch.where(x < 0, (x + 2 * a) ** 2 / (8 * a * a), 1 - (2 * a - x) ** 2 / (8 * a * a))
    assert _ks_uniform(triangular_cdf(log_jitter_ratio.double()), 0.0, 1.0) < 0.035
    rescale_only = Dinov3NavitConfig(hidden_size=32, num_attention_heads=2)  # transformers' default: rescale 2.0
    out = modeling.augment_coordinates(coords, plan, rescale_only).view(n, 2, 2)
    scale = out[:, 1] - out[:, 0]
    torch.testing.assert_close(scale[:, 0], scale[:, 1])  # one factor for both axes
    assert _ks_uniform(scale[:, 0].log(), -math.log(2.0), math.log(2.0)) < 0.035
    torch.testing.assert_close(out[:, 0], torch.zeros(n, 2))  # no shift


def _expected_rope(h: int, w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [h·w, 16] of an h×w frame in raster order, from DINOv3's RoPE formula (head_dim 16, θ = 100)."""
    inv_freq = torch.tensor([100.0 ** -(k / 4) for k in range(4)], dtype=torch.float64)
    coords = torch.tensor([(2 * (r + 0.5) / h - 1, 2 * (c + 0.5) / w - 1) for r, c in block_order(h, w, 1)])
    angles = (2 * math.pi * coords.double()[:, :, None] * inv_freq).flatten(1)  # [y-freqs, x-freqs]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def test_rope_rows_eval_exact_prefix_identity_and_video_frames_share_the_draw():
    model = randomize_(Dinov3NavitModel(Dinov3NavitConfig(**BASE)))
    grids = [(2, 4, 6), (1, 6, 2)]
    layout = model.eval().plan(*_random_inputs(model.config, grids))
    cos, sin = model.encoder.rotary_embeddings(layout)  # [S, 16], sequence rows
    patch_cos, patch_sin = cos[layout.restore_index], sin[layout.restore_index]  # patches in input order
    for rows, (h, w) in ((slice(0, 24), (4, 6)), (slice(24, 48), (4, 6)), (slice(48, 60), (6, 2))):
        expected_cos, expected_sin = _expected_rope(h, w)
        torch.testing.assert_close(patch_cos[rows], expected_cos)
        torch.testing.assert_close(patch_sin[rows], expected_sin)
    assert bool((cos[layout.prefix_index] == 1).all()) and bool((sin[layout.prefix_index] == 0).all())

    model.train()
    trained, _ = model.encoder.rotary_embeddings(layout)
    trained = trained[layout.restore_index]
    torch.testing.assert_close(trained[:24], trained[24:48])  # the video's two frames: one draw
    assert not torch.allclose(trained[:24], cos[layout.restore_index][:24])  # augmented in training
    assert bool((model.encoder.rotary_embeddings(layout)[0][layout.prefix_index] == 1).all())


# ----------------------------------------------------------------------------------------------------------------------
# runtime features (tiny random models, no reference needed)
# ----------------------------------------------------------------------------------------------------------------------


def _random_inputs(config, grids, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(t * h * w for t, h, w in grids)
    return torch.randn(total, 3 * config.patch_size**2, generator=generator), torch.tensor(grids)


GRIDS = [(1, 6, 4), (2, 2, 4), (1, 4, 8)]


def tiny_model(attn: str = "sdpa", **overrides) -> Dinov3NavitModel:
    config = Dinov3NavitConfig(**{**BASE, "hidden_stride": 2, **overrides})
    config._attn_implementation = attn
    return randomize_(Dinov3NavitModel(config)).eval()


def test_return_dict_false_gives_the_fields_in_order():
    model = tiny_model()
    inputs = _random_inputs(model.config, GRIDS)
    with torch.no_grad():
        out = model(*inputs)
        last, pooled, prefix = model(*inputs, return_dict=False)
    for a, b in zip((last, pooled, prefix), (out.last_hidden_state, out.pooler_output, out.prefix_tokens)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(pooled, prefix[:, 0])


def test_drop_path_drops_each_branch_per_frame():
    """Training with drop_path_rate 0.5: each frame's attention and MLP branch is, independently, dropped or scaled
    by 1 / (1 − 0.5) = 2 (transformers drops per sample; a frame is a packed sample)."""
    model = tiny_model(drop_path_rate=0.5, num_hidden_layers=1)
    layer = model.layer[0]
    inputs = _random_inputs(model.config, GRIDS * 3)
    layout = model.plan(*inputs)
    hidden = model.embeddings(inputs[0], layout)
    context = core.AttentionContext(model.encoder.rotary_embeddings(layout), layout.full, core.sdpa_packed_attention)
    with torch.no_grad():
        torch.manual_seed(3)
        dropped, _ = layer.train()(hidden, context)
        attention, _ = layer.eval().attention_branch(hidden, context)
        candidates = {}  # (attention kept, mlp kept) -> output of every row
        for keep_attention in (0, 1):
            after_attention = hidden + 2 * keep_attention * attention
            mlp = layer.mlp_branch(after_attention)
            for keep_mlp in (0, 1):
                candidates[keep_attention, keep_mlp] = after_attention + 2 * keep_mlp * mlp
    cu = layout.full.cu_seqlens_host.tolist()
    outcomes = []
    for start, end in zip(cu[:-1], cu[1:]):
        frame = dropped[start:end]
        matches = [k for k, rows in candidates.items() if torch.allclose(frame, rows[start:end], atol=1e-5)]
        assert len(matches) == 1, matches  # the whole frame follows one draw per branch
        outcomes.append(matches[0])
    assert len(set(outcomes)) >= 3, outcomes  # 12 frames: the draws differ between frames


def test_bf16_tracks_fp32():
    model = tiny_model()
    inputs = _random_inputs(model.config, GRIDS)
    with torch.no_grad():
        expected = model(*inputs)
        out = model.to(torch.bfloat16)(*inputs)
    assert out.last_hidden_state.dtype == out.prefix_tokens.dtype == torch.bfloat16
    assert agreement(out.last_hidden_state, expected.last_hidden_state)[0] > 0.99
    assert agreement(out.pooler_output, expected.pooler_output)[0] > 0.99


@pytest.mark.parametrize(
    "call, message",
    [  # DINOv3's own input; the inputs every family shares: test_family_contract.py
        (lambda m, pv, g: m(pv, g, bool_masked_pos=torch.zeros(3, dtype=torch.bool)), "bool_masked_pos"),
        (lambda m, pv, g: m(pv, g, bool_masked_pos=torch.zeros(pv.shape[0])), "boolean"),
        (lambda m, pv, g: m(pv, g, pixel_mask=None), "Unexpected arguments"),
    ],
)
def test_bad_inputs_raise_value_errors(call, message, monkeypatch):
    model = tiny_model()
    pixel_values, grids = _random_inputs(model.config, GRIDS)
    monkeypatch.setattr(model, "encode", lambda *a, **k: pytest.fail("computed before validating"))
    with pytest.raises(ValueError, match=message):
        call(model, pixel_values, grids)


@pytest.mark.parametrize(
    "field, message",
    [
        (dict(num_attention_heads=16), "divisible by 4"),
        (dict(temporal_patch_size=2), "temporal_patch_size"),
        (dict(num_register_tokens=-1), "num_register_tokens"),
        (dict(pos_embed_jitter=0.5), "pos_embed_jitter"),
        (dict(pos_embed_shift=-1.0), "pos_embed_shift"),
        (dict(hidden_stride=0), "hidden_stride"),
        (dict(hidden_act="nope"), "hidden_act"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(cpu_block_tokens=0), "cpu_block_tokens"),
    ],
)
def test_bad_config_fields_raise_value_errors(field, message):
    with pytest.raises(ValueError, match=message):
        Dinov3NavitConfig(**{**BASE, **field})


# ----------------------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------------------


def test_converted_folder_is_complete_and_loads_strictly(sources, converted):
    folder = converted[("base", 2)]
    names = {p.name for p in folder.iterdir()}
    assert set(utils.DINOV3.code_files) | {"model.safetensors", "config.json", "README.md"} <= names
    assert {"preprocessor_config.json", "processor_config.json", "examples", "pictures"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == utils.DINOV3.auto_map and config["model_type"] == "dinov3_navit"
    assert (config["hidden_stride"], config["num_register_tokens"], config["pos_embed_jitter"]) == (2, 2, 1.3)
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    source = load_file(str(sources["base"] / "model.safetensors"))
    written = load_file(str(folder / "model.safetensors"))
    assert written.keys() == source.keys() == model.state_dict().keys()  # the files' names, unchanged
    for name, tensor in source.items():
        assert torch.equal(written[name], tensor), name
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert (processor.patch_size, processor.hidden_stride) == (PATCH, 2)


def test_processor_carries_the_source_normalisation_or_the_family_defaults(converted):
    carried = json.loads((converted[("base", 1)] / "preprocessor_config.json").read_text())
    assert {k: carried[k] for k in SOURCE_NORMALISATION} == SOURCE_NORMALISATION
    default = json.loads((converted[("gated", 1)] / "preprocessor_config.json").read_text())
    assert default["image_mean"] == [0.485, 0.456, 0.406] and default["image_std"] == [0.229, 0.224, 0.225]
    assert default["resample"] == 2  # bilinear


def _source_copy(sources, tmp_path, edit=None) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    state = load_file(str(sources["gated"] / "model.safetensors"))
    if edit is not None:
        state = edit(state)
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text((sources["gated"] / "config.json").read_text())
    return src


def test_bad_source_normalisation_is_refused_before_writing(sources, tmp_path):
    src = _source_copy(sources, tmp_path)
    (src / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5], "resample": 2}))
    with pytest.raises(utils.ConversionError, match="image_mean"):
        convert_dinov3.convert(src, tmp_path / "dst")
    (src / "preprocessor_config.json").write_text(json.dumps({"resample": "no-such-filter"}))
    with pytest.raises(utils.ConversionError, match="resample"):
        convert_dinov3.convert(src, tmp_path / "dst")
    (src / "preprocessor_config.json").write_text(json.dumps({"resample": "bicubic"}))
    dst = convert_dinov3.convert(src, tmp_path / "dst")
    assert json.loads((dst / "preprocessor_config.json").read_text())["resample"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_layers_saved_under_the_module_path_are_accepted(sources, tmp_path):
    """Files that name the layers by transformers' module path (`model.layer.N`) convert to the usual names."""
    src = _source_copy(
        sources, tmp_path, lambda state: {("model." + k if k.startswith("layer.") else k): v for k, v in state.items()}
    )
    dst = convert_dinov3.convert(src, tmp_path / "dst")
    expected = load_file(str(sources["gated"] / "model.safetensors"))
    assert load_file(str(dst / "model.safetensors")).keys() == expected.keys()


def test_shape_mismatch_and_missing_tensors_are_refused(sources, tmp_path):
    bad = _source_copy(sources, tmp_path, lambda s: {**s, "norm.weight": torch.ones(31)})
    with pytest.raises(utils.ConversionError, match=r"norm.weight: checkpoint \(31,\) vs config \(32,\)"):
        convert_dinov3.convert(bad, tmp_path / "dst")
    (bad / "model.safetensors").unlink()
    state = load_file(str(sources["gated"] / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "norm.bias"}, str(bad / "model.safetensors"))
    with pytest.raises(utils.ConversionError, match="missing 1 tensor"):
        convert_dinov3.convert(bad, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_destination_is_written_atomically_and_replaced_only_with_overwrite(sources, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("keep me")
    assert convert_dinov3.main([str(sources["gated"]), str(dst)]) == 1
    assert "--overwrite" in capsys.readouterr().err and (dst / "old.txt").exists()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(utils, "save_file", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_dinov3.convert(sources["gated"], dst, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"] and (dst / "old.txt").exists()  # no temp left
    monkeypatch.undo()
    assert convert_dinov3.main([str(sources["gated"]), str(dst), "--overwrite", "--hidden-stride", "2"]) == 0
    assert not (dst / "old.txt").exists() and json.loads((dst / "config.json").read_text())["hidden_stride"] == 2


def test_pickle_only_and_foreign_sources_are_refused(tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    (src / "config.json").write_text(json.dumps({"model_type": "dinov3_vit"}))
    with pytest.raises(utils.ConversionError, match="pickle"):
        convert_dinov3.convert(src, tmp_path / "dst")
    save_file({"x": torch.zeros(1)}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "dinov3_convnext"}))
    with pytest.raises(utils.ConversionError, match="dinov3_vit"):
        convert_dinov3.convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_device_map_loading_matches(converted):
    folder = converted[("gated", 2)]
    inputs = _random_inputs(Dinov3NavitConfig(**GATED), [(1, 4, 6), (1, 2, 2)])
    plain = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    mapped = AutoModel.from_pretrained(folder, trust_remote_code=True, device_map="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(mapped(*inputs).last_hidden_state, plain(*inputs).last_hidden_state)


def readme_folder(base: Path) -> str:
    """A tiny converted DINOv3 folder for the README's snippets (`"path/to/dinov3-navit"`): 16-px patches, so that the
    processor's default pixel budget gives real token counts."""
    source = write_source(Path(base) / "dinov3-source", **{**BASE, "patch_size": 16})
    return str(convert_dinov3.convert(source, Path(base) / "dinov3-navit", hidden_stride=2))
