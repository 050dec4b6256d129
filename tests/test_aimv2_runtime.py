# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""AIMv2 NaViT outputs (hidden states, attention maps, tuples, the pooling head), bf16, device_map and config
validation. Tiny random models, every parameter randomised; references are the plain fp32 model and each image alone.

Agreement with transformers' Aimv2VisionModel is in test_aimv2.py; the runtime contract every family shares (backends,
switching, checkpointing, compile, the CPU block schedule, keep_indices, bad inputs) in test_family_contract.py.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

from siglip2_navit.tools import checkpoint_utils as utils  # noqa: E402
from conftest import packed_inputs  # noqa: E402
from test_aimv2 import randomize_  # noqa: E402
from transformers import AutoModel  # noqa: E402

from siglip2_navit.configuration_aimv2_navit import Aimv2NavitConfig  # noqa: E402
from siglip2_navit.modeling_aimv2_navit import Aimv2NavitModel  # noqa: E402


GRIDS = [(1, 4, 6), (1, 6, 4), (1, 2, 2), (1, 8, 8), (1, 4, 6)]  # equal lengths apart: exercises regrouping
TINY = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=4, hidden_stride=2,
    is_native=True, qkv_bias=True, mlp_bias=True,
)


def tiny_aimv2(attn_implementation: str = "sdpa", seed: int = 0, **overrides) -> Aimv2NavitModel:
    torch.manual_seed(seed)
    model = randomize_(Aimv2NavitModel(Aimv2NavitConfig(**{**TINY, **overrides})), seed).eval()
    model.config._attn_implementation = attn_implementation  # read at every forward (flash: no import check here)
    return model


def hub_folder(model: Aimv2NavitModel, folder: Path) -> Path:
    """A complete AIMv2 NaViT Hub folder of `model` (what the converter writes: config, weights, code, processor)."""
    return utils.atomic_write_folder(folder, lambda tmp: utils.save_model_folder(tmp, model.state_dict(), model.config))


# ----------------------------------------------------------------------------------------------------------------------
# outputs: hidden states, attention maps, pooling
# ----------------------------------------------------------------------------------------------------------------------


def test_hidden_states_attentions_and_tuple_outputs():
    model = tiny_aimv2("eager")
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    with torch.no_grad():
        out = model(pixel_values, grid, output_hidden_states=True, output_attentions=True)
        as_tuple = model(pixel_values, grid, return_dict=False)
    n = pixel_values.shape[0]
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (n, 32) for h in out.hidden_states)
    torch.testing.assert_close(model.rms_norm(out.hidden_states[-1]), out.last_hidden_state)  # before the final norm
    assert len(out.attentions) == model.config.num_hidden_layers
    for layer_maps in out.attentions:
        assert [m.shape for m in layer_maps] == [(4, t * h * w, t * h * w) for t, h, w in GRIDS]  # one per image
        for maps in layer_maps:
            torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
    assert out.pooler_output.shape == (len(GRIDS), 32)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)
    torch.testing.assert_close(as_tuple[1], out.pooler_output)
    torch.testing.assert_close(model.get_image_features(pixel_values, grid), out.pooler_output)


def test_pooling_head_sees_only_its_own_image():
    """Pooled output of an image is the same alone and packed with others (no cross-image leak in the head)."""
    model = tiny_aimv2()
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    with torch.no_grad():
        packed = model(pixel_values, grid).pooler_output
        offset = 0
        for i, (t, h, w) in enumerate(GRIDS):
            alone = model(pixel_values[offset : offset + t * h * w], [[t, h, w]]).pooler_output
            offset += t * h * w
            torch.testing.assert_close(packed[i : i + 1], alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# dtypes and devices
# ----------------------------------------------------------------------------------------------------------------------


def test_bf16_follows_fp32():
    model = tiny_aimv2()
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    with torch.no_grad():
        fp32 = model(pixel_values, grid)
        bf16 = model.to(torch.bfloat16)(pixel_values, grid)  # fp32 pixels are cast inside
    assert bf16.last_hidden_state.dtype == bf16.pooler_output.dtype == torch.bfloat16
    assert F.cosine_similarity(bf16.last_hidden_state.float(), fp32.last_hidden_state, dim=-1).min() > 0.99
    assert F.cosine_similarity(bf16.pooler_output.float(), fp32.pooler_output, dim=-1).min() > 0.99


def test_loads_with_device_map(tmp_path):
    model = tiny_aimv2()
    folder = hub_folder(model, tmp_path / "aimv2")
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True, device_map="cpu").eval()
    assert loaded.device.type == "cpu"
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values, grid).pooler_output, model(pixel_values, grid).pooler_output)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_size=30), "divisible by `num_attention_heads`"),
        (dict(hidden_size=34, num_attention_heads=2), "sin-cos .* divisible by 4"),
        (dict(temporal_patch_size=2), "must be 1"),
        (dict(hidden_stride=0), "positive integer"),
        (dict(cpu_block_tokens=0), "positive integer or None"),
        (dict(hidden_act="no_such_act"), "hidden_act"),
        (dict(is_native="yes"), "must be true or false"),
        (dict(rms_norm_eps=0.0), "finite number > 0"),
        (dict(is_native=False, image_size=8, patch_size=14), "at least `patch_size`"),
    ],
)
def test_config_fields_are_validated(overrides, match):
    with pytest.raises(ValueError, match=match):
        Aimv2NavitConfig(**{**TINY, **overrides})


def test_config_changed_after_init_is_checked_when_the_model_is_built():
    config = Aimv2NavitConfig(**TINY)
    config.hidden_stride = -1
    with pytest.raises(ValueError, match="`hidden_stride` must be a positive integer"):
        Aimv2NavitModel(config)
