# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""AIMv2 NaViT runtime features (issue 13): every attention backend and runtime switching, token dropping, hidden
states and attention maps, gradient checkpointing, torch.compile without recompiles, bf16, device_map, the CPU block
schedule, bad inputs, and scripts/encode.py on a converted folder. Tiny random models, every parameter randomised.

Agreement with transformers' Aimv2VisionModel is in test_aimv2.py; here the references are the eager backend, the
un-checkpointed / un-compiled / fp32 model and the plain one-op-over-all-tokens path.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

from siglip2_navit.tools import checkpoint_utils as utils  # noqa: E402
from conftest import cpu_flash_varlen, enable_checkpointing, packed_inputs  # noqa: E402
from test_aimv2 import randomize_  # noqa: E402
from test_performance import GraphCounter  # noqa: E402
from transformers import AutoModel  # noqa: E402

from siglip2_navit import navit_attention  # noqa: E402
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


@pytest.fixture
def fake_flash(monkeypatch):
    """flash_attention_2 on CPU: the core's flash-attn entry point served by a plain per-sequence softmax."""
    monkeypatch.setitem(navit_attention._FLASH_VARLEN, "fn", cpu_flash_varlen)


def _registered_batched_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A function registered with transformers' AttentionInterface ([n, heads, L, head_dim] in, [n, L, ·] out)."""
    assert attention_mask is None
    probs = (query @ key.transpose(-1, -2) * scaling).softmax(-1)
    return (probs @ value).transpose(1, 2), None


# ----------------------------------------------------------------------------------------------------------------------
# attention backends
# ----------------------------------------------------------------------------------------------------------------------


def test_backends_agree_on_outputs_and_gradients(fake_flash, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "test_aimv2_batched", _registered_batched_attention)
    results = {}
    for backend in ("eager", "sdpa", "flash_attention_2", "test_aimv2_batched"):
        model = tiny_aimv2(backend).train()
        pixel_values, grid = packed_inputs(model.config, GRIDS)
        pixel_values.requires_grad_(True)
        out = model(pixel_values, grid)
        loss = (out.last_hidden_state * torch.linspace(-1, 1, out.last_hidden_state.numel()).view_as(
            out.last_hidden_state)).sum() + out.pooler_output.square().sum()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results[backend] = (out.last_hidden_state.detach(), out.pooler_output.detach(), pixel_values.grad, grads)
    reference = results.pop("eager")
    for backend, (tokens, pooled, input_grad, grads) in results.items():
        torch.testing.assert_close(tokens, reference[0], atol=1e-4, rtol=1e-4, msg=backend)
        torch.testing.assert_close(pooled, reference[1], atol=1e-4, rtol=1e-4, msg=backend)
        torch.testing.assert_close(input_grad, reference[2], atol=1e-4, rtol=1e-4, msg=backend)
        assert set(grads) == set(reference[3])
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[3][name], atol=1e-4, rtol=1e-4, msg=f"{backend} {name}")


def test_set_attn_implementation_switches_the_backend_at_runtime(tmp_path, fake_flash):
    folder = hub_folder(tiny_aimv2(), tmp_path / "aimv2")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
    assert type(model).__name__ == "Aimv2NavitModel" and model.config._attn_implementation == "eager"
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    remote_core = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".navit_core"]  # the remote-code copy
    originals = dict(remote_core.PACKED_ATTENTION_FUNCTIONS)
    calls = []

    def spy(backend):
        def attention(*args, **kwargs):
            calls.append(backend)
            return originals[backend](*args, **kwargs)

        return attention

    try:
        remote_core.PACKED_ATTENTION_FUNCTIONS.update({name: spy(name) for name in ("sdpa", "eager")})
        with torch.no_grad():
            eager = model(pixel_values, grid)
            model.set_attn_implementation("sdpa")
            assert model.config._attn_implementation == "sdpa"
            sdpa = model(pixel_values, grid)
    finally:
        remote_core.PACKED_ATTENTION_FUNCTIONS.update(originals)
    assert calls == ["eager"] * 2 + ["sdpa"] * 2  # one call per layer, on the backend of the moment
    torch.testing.assert_close(sdpa.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa.pooler_output, eager.pooler_output, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# outputs: hidden states, attention maps, pooling, token dropping
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


def test_attention_maps_with_a_fast_backend_fall_back_to_eager():
    model = tiny_aimv2("sdpa")
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    with torch.no_grad():
        maps = model(pixel_values, grid, output_attentions=True).attentions
        model.set_attn_implementation("eager")
        eager_maps = model(pixel_values, grid, output_attentions=True).attentions
    for ours, reference in zip(maps, eager_maps):
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b)


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


def test_keep_indices_covering_every_row_is_the_normal_forward_and_sampling_keeps_blocks():
    model = tiny_aimv2()
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    with torch.no_grad():
        full = model(pixel_values, grid)
        every = model(pixel_values, grid, keep_indices=torch.arange(pixel_values.shape[0]))
        keep = model.sample_keep_indices(grid, 0.5, generator=torch.Generator().manual_seed(0))
        dropped = model(pixel_values, grid, keep_indices=keep)
    torch.testing.assert_close(every.last_hidden_state, full.last_hidden_state)
    torch.testing.assert_close(every.pooler_output, full.pooler_output)
    assert dropped.last_hidden_state.shape == (keep.numel(), 32) and keep.numel() < pixel_values.shape[0]
    assert torch.equal(keep.view(-1, 4), keep.view(-1, 4)[:, :1] + torch.arange(4))  # whole 2×2 blocks
    again = model.sample_keep_indices(grid, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_an_image_without_kept_tokens_is_refused_with_the_head_and_allowed_without():
    pixel_values, grid = packed_inputs(tiny_aimv2().config, [(1, 2, 2), (1, 2, 4)])
    keep = torch.arange(4, 12)  # image 0 keeps nothing
    with pytest.raises(ValueError, match=r"Frames \[0\].*keep no tokens"):
        tiny_aimv2()(pixel_values, grid, keep_indices=keep)
    with torch.no_grad():
        out = tiny_aimv2(use_head=False)(pixel_values, grid, keep_indices=keep)
    assert out.last_hidden_state.shape == (8, 32) and out.pooler_output is None


# ----------------------------------------------------------------------------------------------------------------------
# training, compile, dtypes, devices, the CPU block schedule
# ----------------------------------------------------------------------------------------------------------------------


def _gradients(model, pixel_values, grid):
    out = model(pixel_values, grid)
    (out.last_hidden_state.sin().sum() + out.pooler_output.sum()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    pixel_values, grid = packed_inputs(tiny_aimv2().config, GRIDS)
    plain = _gradients(tiny_aimv2().train(), pixel_values, grid)
    model = tiny_aimv2().train()
    enable_checkpointing(model, use_reentrant=use_reentrant)
    if use_reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    assert model.encoder.gradient_checkpointing
    checkpointed = _gradients(model, pixel_values, grid)
    assert set(checkpointed) == set(plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_torch_compile_serves_new_batch_compositions_without_recompiling():
    torch._dynamo.reset()
    model = tiny_aimv2()
    counter = GraphCounter()
    compiled = torch.compile(model, dynamic=True, backend=counter)
    new_batches = [[(1, 6, 8), (1, 2, 4)], [(1, 4, 4)] * 5, [(1, 12, 10)], [(1, 2, 2), (1, 4, 4), (1, 2, 2), (1, 10, 2)]]
    with torch.no_grad():
        compiled(*packed_inputs(model.config, GRIDS))
        graphs = counter.graphs
        assert graphs > 0
        with torch._dynamo.config.patch(error_on_recompile=True):
            for grids in new_batches:
                pixel_values, grid = packed_inputs(model.config, grids)
                actual, expected = compiled(pixel_values, grid), model(pixel_values, grid)
                torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)
    assert counter.graphs == graphs
    assert "siglip2_navit.packed_attention" in counter.code  # attention inside the core's opaque op


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


def test_cpu_block_schedule_matches_one_op_over_all_tokens():
    blocked = tiny_aimv2(cpu_block_tokens=40)  # several blocks of whole images
    plain = tiny_aimv2(cpu_block_tokens=None)
    pixel_values, grid = packed_inputs(plain.config, GRIDS)
    with torch.no_grad():
        torch.testing.assert_close(blocked(pixel_values, grid).last_hidden_state,
                                   plain(pixel_values, grid).last_hidden_state, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs and configs: clear ValueErrors before any compute
# ----------------------------------------------------------------------------------------------------------------------


BAD_INPUTS = [
    (lambda pv, g: (pv[:, :-1], g, None), r"C·T·p·p = 3·1·4·4 = 48 values, got 47"),
    (lambda pv, g: (pv[:-4], g, None), r"describes Σ t·h·w = 140 patches but `pixel_values` has 136 rows"),
    (lambda pv, g: (pv, g.float(), None), r"must hold integers"),
    (lambda pv, g: (pv, [[1, 3, 4]], None), r"divisible by hidden_stride=2"),
    (lambda pv, g: (pv.int(), g, None), r"floating-point"),
    (lambda pv, g: (pv.index_fill(0, torch.tensor([7]), float("nan")), g, None), r"NaN or infinite"),
    (lambda pv, g: (pv, g, torch.tensor([0, 1, 2])), r"whole 2×2 blocks"),
    (lambda pv, g: (pv, g, torch.tensor([4, 0, 1, 2, 3])), r"strictly increasing"),
    (lambda pv, g: (pv, g, torch.tensor([1000])), r"must lie in \[0, 140\)"),
]


@pytest.mark.parametrize("make, match", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_are_value_errors_before_compute(make, match, monkeypatch):
    model = tiny_aimv2()
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    monkeypatch.setattr(model.embeddings, "forward", lambda *a, **k: pytest.fail("computed before validating"))
    pixel_values, grid, keep = make(pixel_values, grid)
    with pytest.raises(ValueError, match=match):
        model(pixel_values, grid, keep_indices=keep)


def test_unexpected_forward_arguments_are_refused():
    model = tiny_aimv2()
    with pytest.raises(ValueError, match=r"Unexpected arguments \['image_sizes'\]"):
        model(*packed_inputs(model.config, GRIDS), image_sizes=[(8, 12)])


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
