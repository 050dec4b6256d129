"""Siglip2NavitModel: packing, an independent reference of its math, loading, training, the CUDA kernels. The runtime
contract every family shares (backends, switching, checkpointing, compile, keep_indices, bad inputs) is
tests/test_family_contract.py."""

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, cpu_flash_varlen, enable_checkpointing, packed_inputs, tiny_config, tiny_model, write_hub_folder
from spec_reference import reference_forward
from torch.utils._python_dispatch import TorchDispatchMode

from siglip2_navit import navit_attention
from siglip2_navit.configuration_siglip2_navit import Siglip2NavitConfig
from siglip2_navit import modeling_siglip2_navit as modeling
from siglip2_navit.modeling_siglip2_navit import Siglip2NavitModel


ODD_GRIDS = [(1, 6, 10), (1, 2, 2), (1, 14, 8), (2, 4, 6)]
WINDOWED = dict(num_hidden_layers=3, fullatt_block_indexes=[1])  # layers 0 and 2 windowed (3×3 blocks)


def run(model, pixel_values, grids, **kwargs):
    return model(pixel_values, torch.as_tensor(grids), **kwargs)


REFERENCE_CASES = {
    "full-s2-bicubic": dict(),
    "windowed-s2": WINDOWED,
    "s1-bilinear-antialias": dict(hidden_stride=1, pe_interpolation="bilinear", pe_antialias=True),
    "windowed-s1": dict(hidden_stride=1, window_size=6, **WINDOWED),
    "no-rope-no-pe": dict(use_rope=False, preserve_original_pe=False),
    "video-T2": dict(temporal_patch_size=2),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_matches_independent_reference(case):
    model = tiny_model(**REFERENCE_CASES[case])
    grids = [(1, 6, 10), (2, 4, 6), (1, 14, 8)]
    pixel_values, _ = packed_inputs(model.config, grids)
    out = run(model, pixel_values, grids, output_hidden_states=True)
    ref_last, ref_hidden = reference_forward(model, pixel_values, grids)
    torch.testing.assert_close(out.last_hidden_state.double(), ref_last, atol=2e-5, rtol=2e-5)
    assert len(out.hidden_states) == len(ref_hidden) == model.config.num_hidden_layers + 1
    for got, want in zip(out.hidden_states, ref_hidden):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("antialias", [True, False])
def test_one_patch_wide_and_tall_images_match_reference(antialias):
    """1-wide outputs: PyTorch's antialiased resize is not separable there, so the PE must still match F.interpolate."""
    model = tiny_model(hidden_stride=1, pe_interpolation="bilinear", pe_antialias=antialias, **WINDOWED)
    grids = [(1, 5, 1), (1, 1, 7), (1, 1, 1), (2, 3, 1)]
    pixel_values, _ = packed_inputs(model.config, grids)
    ref_last, _ = reference_forward(model, pixel_values, grids)
    torch.testing.assert_close(run(model, pixel_values, grids).last_hidden_state.double(), ref_last, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_pe_resize_matrices_equal_f_interpolate(mode, antialias):
    """The cached per-axis matrices reproduce F.interpolate in float64 for down- and upscales of either axis; the one
    exception, an antialiased 1-wide output (PyTorch's kernel is not separable there), is exactly where the plan
    keeps F.interpolate."""
    side = 8
    table = torch.randn(3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for height in (1, 2, 3, 5, 8, 13, 40):
        for width in (1, 2, 7, 8, 9, 31):
            if antialias and 1 in (height, width):
                continue
            want = F.interpolate(table[None], size=(height, width), mode=mode, align_corners=False, antialias=antialias)[0]
            resize_h, resize_w = (modeling._resize_matrix(n, side, mode, antialias).double() for n in (height, width))
            got = torch.einsum("hp,cpq,wq->chw", resize_h, table, resize_w)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=f"{mode} antialias={antialias} {height}x{width}")


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_antialiased_pe_takes_the_separable_resize_except_for_one_wide_tables(mode):
    """Per table: down- and upscaled grids of one batch take the cached matrices, a 1-wide grid keeps F.interpolate;
    the model matches the reference, which resizes every table with F.interpolate(antialias=True)."""
    model = tiny_model(hidden_stride=1, pe_interpolation=mode, pe_antialias=True)  # PE table 8×8
    grids = [(1, 6, 12), (1, 12, 12), (1, 5, 1), (1, 3, 4), (1, 1, 9)]
    pixel_values, grid = packed_inputs(model.config, grids)
    plan = model.plan(pixel_values, grid).family
    assert [matrices is None for matrices in plan.pe_resize] == [False, False, True, False, True]
    ref_last, _ = reference_forward(model, pixel_values, grids)
    torch.testing.assert_close(run(model, pixel_values, grids).last_hidden_state.double(), ref_last, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("config", [dict(), WINDOWED], ids=["full", "windowed"])
@pytest.mark.parametrize("drop", [False, True], ids=["all-tokens", "dropped"])
def test_eager_attention_maps_match_reference(config, drop):
    model = tiny_model(attn_implementation="eager", **config)
    grids = [(1, 6, 10), (2, 4, 6), (1, 14, 8)]
    pixel_values, _ = packed_inputs(model.config, grids)
    keep = None
    if drop:  # image 0 (3×5 blocks, windows of 3×3 blocks) loses block rows 0-1 of its left window: its first kept
        # token belongs to the right window; the other images lose a random half of their blocks
        dropped = {bi * 5 + bj for bi in range(2) for bj in range(3)}
        first = torch.tensor([4 * b + r for b in range(15) if b not in dropped for r in range(4)])
        rest = model.sample_keep_indices(grids[1:], 0.5, torch.Generator().manual_seed(3)) + 60
        keep = torch.cat([first, rest])
    out = run(model, pixel_values, grids, output_attentions=True, keep_indices=keep)
    _, _, ref_maps = reference_forward(model, pixel_values, grids, keep=keep, return_maps=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for layer_maps, expected in zip(out.attentions, ref_maps):  # frames in order, windows in raster order
        assert len(layer_maps) == len(expected)
        for got, want in zip(layer_maps, expected):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [dict(), WINDOWED, dict(temporal_patch_size=2, **WINDOWED)], ids=["full", "windowed", "windowed-T2"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_equals_per_image(config, backend):
    model = tiny_model(attn_implementation=backend, **config)
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    packed = model(pixel_values, grid, output_hidden_states=True)
    offset = 0
    for i, (t, h, w) in enumerate(ODD_GRIDS):
        rows = slice(offset, offset + t * h * w)
        alone = model(pixel_values[rows], grid[i : i + 1], output_hidden_states=True)
        assert (packed.last_hidden_state[rows] - alone.last_hidden_state).abs().max() <= 1e-5
        for a, b in zip(packed.hidden_states, alone.hidden_states):
            assert (a[rows] - b).abs().max() <= 1e-5
        offset += t * h * w


def test_video_frames_attend_only_within_themselves():
    model = tiny_model()
    grids = [(2, 4, 6)]
    pixel_values, _ = packed_inputs(model.config, grids)
    both = run(model, pixel_values, grids).last_hidden_state
    first = run(model, pixel_values[:24], [(1, 4, 6)]).last_hidden_state
    second = run(model, pixel_values[24:], [(1, 4, 6)]).last_hidden_state
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-6, rtol=0)


def test_block_order_is_raster_order_regrouped():
    """The s×s block order is only a permutation: features per patch position equal a stride-1 (raster) run."""
    block_model = tiny_model(hidden_stride=2)
    raster_model = tiny_model(hidden_stride=1)
    raster_model.load_state_dict(block_model.state_dict())
    h, w, s = 6, 10, 2
    raster, _ = packed_inputs(block_model.config, [(1, h, w)])
    # raster index of each token in block order
    block_to_raster = torch.tensor(
        [(bi * s + r) * w + bj * s + c for bi in range(h // s) for bj in range(w // s) for r in range(s) for c in range(s)]
    )
    block_out = run(block_model, raster[block_to_raster], [(1, h, w)]).last_hidden_state
    raster_out = run(raster_model, raster, [(1, h, w)]).last_hidden_state
    back = torch.empty_like(block_out)
    back[block_to_raster] = block_out
    torch.testing.assert_close(back, raster_out, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Memory (backends, switching and their agreement: tests/test_family_contract.py)
# ---------------------------------------------------------------------------------------------------------------------


def test_no_intermediate_is_quadratic_in_packed_tokens():
    """64 small images packed: no tensor anywhere in the forward has N² elements (attention is per sequence)."""

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    grids = [(1, 2, 2), (1, 2, 4), (1, 4, 2), (1, 4, 4)] * 16
    for backend in ("sdpa", "eager"):
        model = tiny_model(attn_implementation=backend, hidden_size=16, intermediate_size=32, num_attention_heads=2)
        pixel_values, grid = packed_inputs(model.config, grids)
        n = pixel_values.shape[0]
        LargestOutput.largest = 0
        with torch.no_grad(), LargestOutput():
            model(pixel_values, grid)
        assert LargestOutput.largest < n * n / 8, (backend, LargestOutput.largest, n)


# ---------------------------------------------------------------------------------------------------------------------
# Pooling head, outputs, drop-in surface
# ---------------------------------------------------------------------------------------------------------------------


def test_pooling_head_matches_manual_map_per_image():
    model = tiny_model(vision_use_head=True)
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    out = model(pixel_values, grid)
    assert out.pooler_output.shape == (len(ODD_GRIDS), model.config.hidden_size)
    head = model.vision_model.head
    D, H = model.config.hidden_size, model.config.num_attention_heads
    w, b = head.attention.in_proj_weight.detach(), head.attention.in_proj_bias.detach()
    counts = [t * h * w_ for t, h, w_ in ODD_GRIDS]
    for i, tokens in enumerate(out.last_hidden_state.detach().split(counts)):
        q = (head.probe[0].detach() @ w[:D].T + b[:D]).view(1, H, -1)
        k = (tokens @ w[D : 2 * D].T + b[D : 2 * D]).view(-1, H, D // H)
        v = (tokens @ w[2 * D :].T + b[2 * D :]).view(-1, H, D // H)
        probs = (torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D // H)).softmax(-1)
        x = torch.einsum("hqk,khd->qhd", probs, v).reshape(1, D) @ head.attention.out_proj.weight.T
        x = x + head.attention.out_proj.bias
        y = F.layer_norm(x, (D,), head.layernorm.weight, head.layernorm.bias, model.config.layer_norm_eps)
        x = x + head.mlp.fc2(F.gelu(head.mlp.fc1(y), approximate="tanh"))
        torch.testing.assert_close(out.pooler_output[i], x[0], atol=1e-5, rtol=1e-5)


def test_outputs_without_head_and_as_tuple():
    model = tiny_model()
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    out = model(pixel_values, grid, output_hidden_states=True)
    assert out.pooler_output is None
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    post = model.vision_model.post_layernorm(out.hidden_states[-1])
    torch.testing.assert_close(post, out.last_hidden_state)
    as_tuple = model(pixel_values, grid, output_hidden_states=True, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)
    assert len(as_tuple[1]) == len(out.hidden_states)


def test_ovis_drop_in_surface():
    model = tiny_model(num_hidden_layers=3)
    cfg = model.config
    for attr in ("hidden_size", "patch_size", "hidden_stride", "temporal_patch_size"):
        assert isinstance(getattr(cfg, attr), int)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model._get_block(-1) is model.vision_model.encoder.layers[2]
    attn = model._get_block(1).self_attn
    qkv = model._get_attn_weight(1)
    assert qkv.shape == (3 * cfg.hidden_size, cfg.hidden_size)
    torch.testing.assert_close(qkv[cfg.hidden_size : 2 * cfg.hidden_size], attn.k_proj.weight)
    assert model._get_pose_embed() is model.vision_model.embeddings.position_embedding.weight
    assert model.get_input_embeddings() is model.vision_model.embeddings.patch_embedding
    # positional call, as Ovis' visual tokenizer does
    pixel_values, grid = packed_inputs(cfg, [(1, 4, 4)])
    assert model(pixel_values, grid, True).hidden_states is not None


def test_grid_thws_as_list_numpy_and_tensor_agree():
    model = tiny_model()
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    ref = model(pixel_values, grid).last_hidden_state
    for g in (ODD_GRIDS, np.array(ODD_GRIDS, dtype=np.int32), grid.int()):
        torch.testing.assert_close(model(pixel_values, g).last_hidden_state, ref)


# ---------------------------------------------------------------------------------------------------------------------
# Config, saving and loading
# ---------------------------------------------------------------------------------------------------------------------


# The default configuration, written out (not read from the config class): the Ovis2.5 / so400m/16 vision tower.
SPEC_DEFAULTS = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, num_channels=3,
    patch_size=16, temporal_patch_size=1, image_size=512, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    attention_dropout=0.0, hidden_stride=2, window_size=112, fullatt_block_indexes=None, preserve_original_pe=True,
    use_rope=True, rope_theta=10000.0, pe_interpolation="bicubic", pe_antialias=False, vision_use_head=False,
    num_patches=-1,
)


@pytest.mark.parametrize("source", ["config.json", "class defaults"])
def test_config_defaults_are_the_spec_table(source):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(REPO_ROOT, trust_remote_code=True) if source == "config.json" else Siglip2NavitConfig()
    assert {key: getattr(config, key) for key in SPEC_DEFAULTS} == SPEC_DEFAULTS
    assert config.model_type == "siglip2_navit"


def test_root_config_json_is_the_so400m_ovis_default():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(REPO_ROOT, trust_remote_code=True)
    default = Siglip2NavitConfig()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                "image_size", "hidden_stride", "window_size", "temporal_patch_size", "pe_interpolation", "use_rope"):
        assert getattr(config, key) == getattr(default, key), key
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (1152, 27, 4304)
    assert config.auto_map["AutoModel"] == "modeling_siglip2_navit.Siglip2NavitModel"


def test_fullatt_block_indexes_string_form():
    assert tiny_config(num_hidden_layers=4, fullatt_block_indexes="1|3").fullatt_block_indexes == [1, 3]
    model_str = tiny_model(num_hidden_layers=3, fullatt_block_indexes="1")
    model_list = tiny_model(num_hidden_layers=3, fullatt_block_indexes=[1])
    pixel_values, grid = packed_inputs(model_str.config, ODD_GRIDS)
    torch.testing.assert_close(model_str(pixel_values, grid).last_hidden_state, model_list(pixel_values, grid).last_hidden_state)
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        tiny_config(fullatt_block_indexes="1,3")
    with pytest.raises(ValueError, match="out of range"):
        tiny_config(fullatt_block_indexes=[5])


@pytest.mark.parametrize("bad", [dict(hidden_size=30), dict(pe_interpolation="nearest"), dict(patch_size=0)])
def test_invalid_config_raises(bad):
    with pytest.raises(ValueError):
        tiny_config(**bad)


def test_save_load_round_trip_through_auto_api(hub_folder):
    from transformers import AutoConfig, AutoModel

    model = tiny_model(vision_use_head=True, **WINDOWED)
    folder = hub_folder(model)
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.fullatt_block_indexes == [1] and config.model_type == "siglip2_navit"
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    direct = Siglip2NavitModel.from_pretrained(folder).eval()
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    want = model(pixel_values, grid)
    for other in (loaded, direct):
        assert set(other.state_dict()) == set(model.state_dict())
        got = other(pixel_values, grid)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)
        torch.testing.assert_close(got.pooler_output, want.pooler_output)


def test_ovis_prefixed_state_dict_loads_with_no_missing_or_unexpected_keys():
    source = tiny_model(**WINDOWED)
    ovis_state = {f"visual_tokenizer.vit.{k}": v.clone() for k, v in source.state_dict().items()}
    ovis_state["llm.model.embed_tokens.weight"] = torch.zeros(3, 3)  # the rest of an Ovis checkpoint
    prefix = "visual_tokenizer.vit."
    tower = {k[len(prefix) :]: v for k, v in ovis_state.items() if k.startswith(prefix)}
    target = Siglip2NavitModel(source.config).eval()
    result = target.load_state_dict(tower, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    pixel_values, grid = packed_inputs(source.config, ODD_GRIDS)
    torch.testing.assert_close(target(pixel_values, grid).last_hidden_state, source(pixel_values, grid).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_with_fp32_pixels(hub_folder, dtype):
    from transformers import AutoModel

    model = tiny_model()
    folder = hub_folder(model)
    import transformers

    dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    half = AutoModel.from_pretrained(folder, trust_remote_code=True, **{dtype_kwarg: dtype}).eval()
    assert half.dtype == dtype
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    out = half(pixel_values, grid, output_hidden_states=True)
    assert out.last_hidden_state.dtype == dtype and out.hidden_states[-1].dtype == dtype
    ref = model(pixel_values, grid).last_hidden_state
    rel = (out.last_hidden_state.float() - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


def test_device_map_auto_and_meta_init_give_same_outputs(hub_folder):
    from transformers import AutoModel

    model = tiny_model(**WINDOWED)
    folder = hub_folder(model)
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    want = model(pixel_values, grid).last_hidden_state

    mapped = AutoModel.from_pretrained(folder, trust_remote_code=True, device_map="auto").eval()
    torch.testing.assert_close(mapped(pixel_values, grid).last_hidden_state, want)

    with torch.device("meta"):
        empty = Siglip2NavitModel(model.config)
    empty = empty.to_empty(device="cpu").eval()
    empty.load_state_dict(model.state_dict())
    torch.testing.assert_close(empty(pixel_values, grid).last_hidden_state, want)


def test_init_weights_are_finite_and_siglip_like():
    model = Siglip2NavitModel(tiny_config(vision_use_head=True))
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    layer = model.vision_model.encoder.layers[0]
    assert torch.all(layer.self_attn.q_proj.bias == 0)
    assert torch.all(layer.layer_norm1.weight == 1)
    pe = model.vision_model.embeddings.position_embedding.weight
    assert abs(pe.std().item() - 1 / math.sqrt(model.config.hidden_size)) < 0.05


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def test_input_embedding_hooks_fire_and_enable_input_require_grads_feeds_reentrant_checkpointing():
    """Adapters (PEFT) freeze the tower and call `enable_input_require_grads()`: a hook on `get_input_embeddings()`
    makes its output require grad, so that reentrant checkpointed layers still backpropagate into their adapters."""
    model = tiny_model(**WINDOWED)
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():  # CPU inference path too
        model(pixel_values, grid)
    handle.remove()
    assert seen == [(pixel_values.shape[0], model.config.hidden_size)]

    model.train()
    model.requires_grad_(False)
    trainable = model.vision_model.encoder.layers[1].self_attn.q_proj.weight
    trainable.requires_grad_(True)
    enable_checkpointing(model, use_reentrant=True)
    model.enable_input_require_grads()
    model(pixel_values, grid).last_hidden_state.square().mean().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_inference_mode_call_leaves_the_model_trainable():
    """Process-wide caches filled under torch.inference_mode() must not hand inference tensors to a later training
    step on the same image sizes."""
    model = tiny_model(pe_interpolation="bilinear")  # the cached separable PE resize path
    pixel_values, grid = packed_inputs(model.config, [(1, 10, 6)])  # a size no other test uses first
    with torch.inference_mode():
        model(pixel_values, grid)
    model.train()
    model(pixel_values, grid).last_hidden_state.sum().backward()
    assert model.vision_model.embeddings.position_embedding.weight.grad is not None


def test_global_forward_hooks_see_the_mlp_activation_before_gelu():
    """The in-place GELU of inference is skipped when any forward hook, global ones included, could hold fc1's output."""
    model = tiny_model()
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    fc1 = model.vision_model.encoder.layers[0].mlp.fc1
    captured = {}

    def capture(module, args, output):
        if module is fc1:
            captured["input"], captured["output"] = args[0].clone(), output

    handle = torch.nn.modules.module.register_module_forward_hook(capture)
    try:
        with torch.no_grad():
            model(pixel_values, grid)
    finally:
        handle.remove()
    torch.testing.assert_close(captured["output"], F.linear(captured["input"], fc1.weight, fc1.bias))


def test_config_overrides_through_from_pretrained_are_parsed_and_validated(hub_folder):
    """`from_pretrained(folder, **overrides)` sets attributes after __init__: the legacy string form is still parsed and
    inconsistent values are still refused when the model is built."""
    from transformers import AutoConfig, AutoModel

    hub_folder = hub_folder(tiny_model(**WINDOWED))
    config = AutoConfig.from_pretrained(hub_folder, trust_remote_code=True, fullatt_block_indexes="1")
    assert config.fullatt_block_indexes == [1]
    model = AutoModel.from_pretrained(hub_folder, trust_remote_code=True, fullatt_block_indexes="0|1")
    assert model.config.fullatt_block_indexes == [0, 1]
    for bad, match in ((dict(fullatt_block_indexes=[7]), "out of range"), (dict(pe_interpolation="nearest"), "pe_interp")):
        config = AutoConfig.from_pretrained(hub_folder, trust_remote_code=True, **bad)
        with pytest.raises(ValueError, match=match):
            AutoModel.from_config(config, trust_remote_code=True)


def test_outputs_carry_no_compile_markings():
    """Returned tensors are plain: a user function compiled later may branch on their sizes."""
    torch._dynamo.reset()
    model = tiny_model(vision_use_head=True)
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    with torch.no_grad():
        out = model(pixel_values, grid)

    @torch.compile(fullgraph=True, backend="eager")
    def user_code(pooled: torch.Tensor) -> torch.Tensor:
        return pooled * 2 if pooled.shape[0] > 1 else pooled

    torch.testing.assert_close(user_code(out.pooler_output), out.pooler_output * 2)
    torch.testing.assert_close(user_code(out.last_hidden_state), out.last_hidden_state * 2)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_attention_dropout_only_in_training(backend):
    model = tiny_model(attn_implementation=backend, attention_dropout=0.5)
    no_dropout = tiny_model(attn_implementation=backend)
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    eval_out = model(pixel_values, grid).last_hidden_state
    torch.testing.assert_close(eval_out, no_dropout(pixel_values, grid).last_hidden_state)
    model.train()
    torch.manual_seed(1)
    a = model(pixel_values, grid).last_hidden_state
    b = model(pixel_values, grid).last_hidden_state
    assert (a - b).abs().max() > 1e-3 and (a - eval_out).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Per-image features (bad inputs, keep_indices: tests/test_family_contract.py)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [False, True], ids=["headless", "map-head"])
def test_get_image_features_is_each_images_own_embedding(head):
    """One row per image, equal to encoding that image alone: the MAP head's pooled output, or (headless) the mean of
    its tokens after post_layernorm; frames of a video are all its tokens."""
    model = tiny_model(vision_use_head=head)
    grids = [(1, 4, 6), (2, 2, 4), (1, 6, 2)]
    pixel_values, grid = packed_inputs(model.config, grids)
    with torch.no_grad():
        features = model.get_image_features(pixel_values, grid)
        expected, start = [], 0
        for t, h, w in grids:
            rows = pixel_values[start : start + t * h * w]
            start += t * h * w
            alone = model(rows, [(t, h, w)])
            expected.append(alone.pooler_output[0] if head else alone.last_hidden_state.mean(0))
    assert features.shape == (len(grids), model.config.hidden_size)
    torch.testing.assert_close(features, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_get_image_features_averages_the_kept_tokens_when_dropping():
    model = tiny_model()
    grids = [(1, 4, 4), (1, 2, 4)]
    pixel_values, grid = packed_inputs(model.config, grids)
    keep = torch.tensor([0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 18, 19])  # 2 blocks of image 0, 1 block of image 1
    with torch.no_grad():
        features = model.get_image_features(pixel_values, grid, keep_indices=keep)
        tokens = model(pixel_values, grid, keep_indices=keep).last_hidden_state
    torch.testing.assert_close(features, torch.stack([tokens[:8].mean(0), tokens[8:].mean(0)]))

    with pytest.raises(ValueError, match=r"Images \[1\] keep no tokens"):  # the mean of no tokens is undefined
        model.get_image_features(pixel_values, grid, keep_indices=torch.arange(16))


def test_repo_root_is_loadable_as_hub_folder(tmp_path):
    """The .py files at the root import with relative imports only, as transformers' remote-code loader needs."""
    model_files = (
        "configuration_siglip2_navit.py", "modeling_siglip2_navit.py", "navit_core.py", "navit_layout.py",
        "navit_attention.py", "navit_image_utils.py",
    )
    for name in model_files:
        source = (REPO_ROOT / name).read_text()
        assert "from siglip2_navit" not in source and "import siglip2_navit" not in source
    shutil.copy(REPO_ROOT / "config.json", tmp_path / "config.json")
    for name in model_files:
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    model = AutoModel.from_config(config, trust_remote_code=True)
    assert type(model).__name__ == "Siglip2NavitModel"
    write_hub_folder  # noqa: B018 (the helper is exercised by the round-trip tests)


def test_sdpa_uses_torch_varlen_kernel_with_the_packed_partition(monkeypatch):
    """The CUDA branch of `sdpa` (torch.nn.attention.varlen) gets the right cu_seqlens/max_seqlen/scale (CPU stand-in)."""
    calls = []

    def fake_varlen_attn(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None):
        calls.append((cu_q.dtype, max_q))
        return cpu_flash_varlen(query, key, value, cu_q, cu_k, max_q, max_k, softmax_scale=scale)

    model = tiny_model(**WINDOWED)
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    want = model(pixel_values, grid).last_hidden_state
    monkeypatch.setattr(navit_attention, "_torch_varlen_usable", lambda query, dropout: dropout == 0.0)
    monkeypatch.setattr(navit_attention, "_torch_varlen_attention", lambda: fake_varlen_attn)
    torch.testing.assert_close(model(pixel_values, grid).last_hidden_state, want, atol=1e-5, rtol=1e-5)
    assert len(calls) == model.config.num_hidden_layers and all(dtype == torch.int32 for dtype, _ in calls)
    assert {max_q for _, max_q in calls} == {14 * 8, 36}  # largest frame (full layer), largest 6×6 window


@pytest.mark.parametrize("scale", [None, 0.125, 0.3])
def test_torch_varlen_kernel_without_scale_argument_gets_the_scale_folded_into_queries(scale, monkeypatch):
    """torch 2.10's `varlen_attn` has no `scale` argument (it always uses head_dim**-0.5): the loader adapts it, so the
    sdpa CUDA branch computes the same attention on torch 2.10 and on torch >= 2.11."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    seen = []

    def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        seen.append(query)
        default_scale = query.shape[-1] ** -0.5
        return cpu_flash_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=default_scale)

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn_2_10)
    kernel = navit_attention._load_torch_varlen()
    assert kernel is not varlen_attn_2_10
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(11, 2, 16, generator=generator) for _ in range(3))  # head_dim 16: default 0.25
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    want = cpu_flash_varlen(query, key, value, cu, cu, 7, 7, softmax_scale=0.25 if scale is None else scale)
    torch.testing.assert_close(kernel(query, key, value, cu, cu, 7, 7, scale=scale), want)
    assert (seen[0] is query) == (scale is None)  # the default scale needs no extra multiply

    def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        raise AssertionError("not called")

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn_2_11)
    assert navit_attention._load_torch_varlen() is varlen_attn_2_11  # torch >= 2.11: used as it is


# ---------------------------------------------------------------------------------------------------------------------
# CUDA, for real (run with `pytest -m gpu` on a GPU machine; skipped elsewhere; the CPU stand-ins above cover the logic)
# ---------------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, **WINDOWED)  # head_dim 32


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().cpu() - want.float().cpu()).norm() / want.float().norm())


needs_torch_varlen = pytest.mark.skipif(
    navit_attention._torch_varlen_attention() is None, reason="this torch has no torch.nn.attention.varlen (torch < 2.10)"
)


def _counting_varlen(monkeypatch) -> list:
    """Route the sdpa CUDA branch through a wrapper of torch's real varlen kernel that counts its calls."""
    kernel = navit_attention._torch_varlen_attention()
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(navit_attention, "_torch_varlen_attention", lambda: counting)
    return calls


@needs_cuda
@needs_torch_varlen
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_sdpa_runs_torch_varlen_and_matches_fp32(dtype, monkeypatch):
    model = tiny_model(**GPU_CONFIG)
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    with torch.no_grad():
        want = model(pixel_values, grid).last_hidden_state  # fp32 CPU
        calls = _counting_varlen(monkeypatch)
        half = model.to("cuda", dtype)
        got = half(pixel_values.cuda(), grid).last_hidden_state  # grid_thws stays on the CPU
    assert calls == [dtype] * model.config.num_hidden_layers
    assert got.dtype == dtype and got.is_cuda
    assert _relative_error(got, want) < 3e-2


@needs_cuda
@needs_torch_varlen
@pytest.mark.gpu
def test_cuda_training_step_through_torch_varlen_matches_fp32_gradients(monkeypatch):
    model = tiny_model(**GPU_CONFIG).train()
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    model(pixel_values, grid).last_hidden_state.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = _counting_varlen(monkeypatch)
    model.to("cuda", torch.bfloat16)
    model(pixel_values.cuda(), grid).last_hidden_state.float().square().mean().backward()
    assert len(calls) == model.config.num_hidden_layers
    for name, param in model.named_parameters():
        assert torch.isfinite(param.grad).all(), name
    # bf16 vs fp32 over the whole gradient (single small-norm tensors are too noisy to bound one by one)
    got = torch.cat([p.grad.float().cpu().flatten() for _, p in model.named_parameters()])
    assert _relative_error(got, torch.cat([want[n].flatten() for n, _ in model.named_parameters()])) < 0.05


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cuda_fp32_backends_match_cpu_with_inputs_on_either_device(backend):
    """fp32 on CUDA (grouped SDPA / eager kernels): same as on CPU, whether pixel_values and grid_thws are on the
    CPU or on the GPU."""
    model = tiny_model(attn_implementation=backend, **GPU_CONFIG)
    pixel_values, grid = packed_inputs(model.config, ODD_GRIDS)
    with torch.no_grad():
        want = model(pixel_values, grid).last_hidden_state
        model.cuda()
        for rows, grid_thws in ((pixel_values, grid), (pixel_values.cuda(), grid.cuda()), (pixel_values.cuda(), grid)):
            got = model(rows, grid_thws).last_hidden_state
            assert got.is_cuda
            torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
