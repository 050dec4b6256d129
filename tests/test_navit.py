"""NaViT properties of Siglip2NavitModel (issue #7): packing holds for *any* batch, token dropping.

- hypothesis: random grids / batch composition / order -> packed == per-image, permutation-equivariance, and
  random token dropping == an independent float64 re-implementation that encodes only the kept tokens;
- token dropping: locality (what may and may not change a kept token), whole frames / images dropped, errors;
- sample_keep_indices: counts, whole groups, sorted, reproducible;
- dtypes / grid containers / meta init together with dropping;
- training: gradient checkpointing + dropping + windowed layers in one step; a toy objective is learnt.
"""

import math
from functools import lru_cache

import numpy as np
import pytest
import torch
from conftest import enable_checkpointing, packed_inputs, tiny_model
from spec_reference import reference_forward
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siglip2_navit.modeling_siglip2_navit import Siglip2NavitModel


# Tiny configs (hidden 32, 2 layers, 4 heads -> head_dim 8). Windowed ones: layer 0 full, layer 1 windowed.
CONFIGS = {
    "full-p2-s2-T1": dict(),
    "windowed-p2-s2-T2": dict(temporal_patch_size=2, fullatt_block_indexes=[0], window_size=8),  # 2x2 blocks
    "windowed-p4-s2-T1": dict(patch_size=4, image_size=32, fullatt_block_indexes=[0], window_size=24),  # 3x3 blocks
    "windowed-p2-s1-bilinear-aa": dict(
        hidden_stride=1, fullatt_block_indexes=[0], window_size=6, pe_interpolation="bilinear", pe_antialias=True
    ),  # 3x3 patches per window
}
ALL_WINDOWED = dict(fullatt_block_indexes=[], window_size=8)  # every layer windowed, 2x2 blocks of 2x2 patches


@lru_cache(maxsize=None)
def model_for(name: str, backend: str = "sdpa") -> Siglip2NavitModel:
    model = tiny_model(seed=3, attn_implementation=backend, **CONFIGS[name])
    for param in model.parameters():
        param.requires_grad_(False)  # shared across tests: nobody trains these
    return model


def block_rows(grids, s):
    """Row indices of each s×s group of each frame: list (per frame) of lists (per group) of packed rows."""
    frames, offset = [], 0
    for t, h, w in grids:
        for _ in range(t):
            n_groups = (h // s) * (w // s)
            frames.append([list(range(offset + g * s * s, offset + (g + 1) * s * s)) for g in range(n_groups)])
            offset += h * w
    return frames


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# Property-based: any batch
# ---------------------------------------------------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@st.composite
def batches(draw, max_images=4):
    name = draw(st.sampled_from(sorted(CONFIGS)))
    s = CONFIGS[name].get("hidden_stride", 2)
    side = st.integers(1, 40 // s).map(lambda n: n * s)
    # mostly small sides (cheap), sometimes up to 40 patches
    small = st.integers(1, 8 // s).map(lambda n: n * s)
    image = st.tuples(st.integers(1, 2), st.one_of(small, side), st.one_of(small, side))
    grids = draw(st.lists(image, min_size=1, max_size=max_images))
    seed = draw(st.integers(0, 2**16))
    return name, grids, seed


@PROPERTY_SETTINGS
@given(batch=batches(), backend=st.sampled_from(["sdpa", "eager"]), data=st.data())
def test_packed_equals_per_image_and_permutation_only_permutes(batch, backend, data):
    name, grids, seed = batch
    model = model_for(name, backend)
    pixel_values, grid = packed_inputs(model.config, grids, seed)
    packed = model(pixel_values, grid).last_hidden_state
    assert packed.shape == (pixel_values.shape[0], model.config.hidden_size)

    sizes = [t * h * w for t, h, w in grids]
    pieces = torch.split(pixel_values, sizes)
    alone = [model(piece, [g]).last_hidden_state for piece, g in zip(pieces, grids)]
    assert max_abs(packed, torch.cat(alone)) <= 1e-5

    order = data.draw(st.permutations(range(len(grids))))
    permuted = model(torch.cat([pieces[i] for i in order]), [grids[i] for i in order]).last_hidden_state
    assert max_abs(permuted, torch.cat([alone[i] for i in order])) <= 1e-5


@PROPERTY_SETTINGS
@given(batch=batches(max_images=3), data=st.data())
def test_random_token_dropping_matches_independent_reference(batch, data):
    name, grids, seed = batch
    model = model_for(name)
    cfg = model.config
    pixel_values, grid = packed_inputs(cfg, grids, seed)
    frames = block_rows(grids, cfg.hidden_stride)
    rate = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.9]))
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for groups in frames:
        if len(frames) > 1 and torch.rand((), generator=generator) < 0.15:
            continue  # the whole frame is dropped
        keep += [row for g in groups if torch.rand((), generator=generator) >= rate for row in g]
    if not keep:
        keep = frames[-1][-1]
    keep_indices = torch.tensor(sorted(keep))

    out = model(pixel_values, grid, keep_indices=keep_indices, output_hidden_states=True)
    want_last, want_hidden = reference_forward(model, pixel_values, grids, keep_indices)
    assert out.last_hidden_state.shape == (len(keep), cfg.hidden_size)
    assert max_abs(out.last_hidden_state, want_last) <= 1e-4
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    for got, want in zip(out.hidden_states, want_hidden):
        assert got.shape == (len(keep), cfg.hidden_size)
        assert max_abs(got, want) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Token dropping: deterministic properties
# ---------------------------------------------------------------------------------------------------------------------

GRIDS = [(2, 6, 8), (1, 4, 4), (1, 8, 6)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reference_agrees_with_model_without_dropping(name):
    """Guards the reference itself: with every token kept it must reproduce the plain forward."""
    model = model_for(name)
    pixel_values, grid = packed_inputs(model.config, GRIDS, seed=1)
    want, _ = reference_forward(model, pixel_values, GRIDS)
    assert max_abs(model(pixel_values, grid).last_hidden_state, want) <= 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_keep_everything_is_exactly_the_normal_forward_for_sampled_rate_zero(name):
    model = model_for(name)
    pixel_values, grid = packed_inputs(model.config, GRIDS, seed=2)
    keep = model.sample_keep_indices(grid, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, torch.arange(pixel_values.shape[0]))
    normal = model(pixel_values, grid, output_hidden_states=True)
    dropped = model(pixel_values, grid, output_hidden_states=True, keep_indices=keep)
    assert torch.equal(dropped.last_hidden_state, normal.last_hidden_state)
    for a, b in zip(dropped.hidden_states, normal.hidden_states):
        assert torch.equal(a, b)


def test_embeddings_of_kept_tokens_are_rows_of_the_full_embeddings():
    """hidden_states[0] is per token: dropping selects rows, each with its own (row, col) PE."""
    model = model_for("windowed-p2-s2-T2")
    pixel_values, grid = packed_inputs(model.config, GRIDS, seed=4)
    keep = model.sample_keep_indices(grid, 0.5, generator=torch.Generator().manual_seed(4))
    full = model(pixel_values, grid, output_hidden_states=True).hidden_states[0]
    kept = model(pixel_values, grid, output_hidden_states=True, keep_indices=keep).hidden_states[0]
    torch.testing.assert_close(kept, full[keep], atol=1e-6, rtol=0)


def _out_at(model, pixel_values, grid, keep, row):
    """Output of packed row `row` (which must be kept) for `keep`."""
    keep = torch.as_tensor(sorted(keep))
    out = model(pixel_values, grid, keep_indices=keep).last_hidden_state
    return out[(keep == row).nonzero().item()]


@pytest.mark.parametrize("name", ["full-p2-s2-T1", "windowed-p2-s2-T2"])
def test_dropping_outside_a_tokens_frame_leaves_it_unchanged_inside_changes_it(name):
    model = model_for(name)
    grids = [(2, 6, 8), (1, 4, 4)]
    pixel_values, grid = packed_inputs(model.config, grids, seed=5)
    frames = block_rows(grids, 2)  # frames: image0 f0, image0 f1, image1
    x_row = frames[0][5][1]  # a token of image 0, frame 0
    everything = range(pixel_values.shape[0])
    base = _out_at(model, pixel_values, grid, everything, x_row)

    other_frame = {r for g in frames[1] for r in g} | {r for g in frames[2][:3] for r in g}
    same = _out_at(model, pixel_values, grid, set(everything) - other_frame, x_row)
    torch.testing.assert_close(same, base, atol=1e-5, rtol=0)

    own_frame = set(frames[0][0])  # another block of X's frame (layer 0 attends to the whole frame)
    changed = _out_at(model, pixel_values, grid, set(everything) - own_frame, x_row)
    assert max_abs(changed, base) > 1e-3


def test_dropping_in_another_window_leaves_a_token_unchanged_when_every_layer_is_windowed():
    model = tiny_model(seed=6, **ALL_WINDOWED)  # windows of 2x2 blocks = 4x4 patches
    grids = [(1, 8, 8)]
    pixel_values, grid = packed_inputs(model.config, grids, seed=6)
    groups = block_rows(grids, 2)[0]  # 16 blocks, raster over a 4x4 block grid
    x_row = groups[0][3]  # block (0, 0): window (0, 0) = blocks (0,0), (0,1), (1,0), (1,1) = groups 0, 1, 4, 5
    everything = set(range(64))
    base = _out_at(model, pixel_values, grid, everything, x_row)
    other_windows = {r for g in (2, 3, 6, 10, 15) for r in groups[g]}
    torch.testing.assert_close(_out_at(model, pixel_values, grid, everything - other_windows, x_row), base, atol=1e-5, rtol=0)
    same_window = set(groups[5])
    assert max_abs(_out_at(model, pixel_values, grid, everything - same_window, x_row), base) > 1e-3


def test_kept_tokens_keep_their_true_positions():
    """Keeping one block far from the origin differs from the same pixels as a tiny image: PE and RoPE use the
    true (row, col), which the reference models; relabelling positions (compaction) would match the small image."""
    model = model_for("full-p2-s2-T1")
    grids = [(1, 8, 8)]
    pixel_values, grid = packed_inputs(model.config, grids, seed=7)
    groups = block_rows(grids, 2)[0]
    keep = sorted(groups[10] + groups[15])  # blocks (2, 2) and (3, 3): rows 4..7, cols 4..7
    got = model(pixel_values, grid, keep_indices=torch.tensor(keep)).last_hidden_state
    want, _ = reference_forward(model, pixel_values, grids, keep)
    assert max_abs(got, want) <= 1e-4
    compacted = model(pixel_values[keep], [(1, 2, 4)]).last_hidden_state
    assert max_abs(got, compacted) > 1e-2


def test_dropping_whole_frames_and_images_equals_encoding_the_rest():
    """Model-only route: dropping a video's second frame == the first frame as a still image; dropping an image ==
    the batch without it."""
    model = model_for("windowed-p2-s2-T2")
    grids = [(1, 4, 6), (2, 6, 4), (1, 2, 2)]
    pixel_values, grid = packed_inputs(model.config, grids, seed=8)
    pieces = list(torch.split(pixel_values, [t * h * w for t, h, w in grids]))
    # drop frame 1 of image 1 and the whole image 2
    keep = list(range(24)) + list(range(24, 48))
    got = model(pixel_values, grid, keep_indices=torch.tensor(keep)).last_hidden_state
    want = model(torch.cat([pieces[0], pieces[1][:24]]), [(1, 4, 6), (1, 6, 4)]).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_frame_or_image_may_lose_every_token_but_not_with_the_pooling_head():
    grids = [(1, 4, 4), (2, 4, 4)]
    model = model_for("windowed-p2-s2-T2")
    pixel_values, grid = packed_inputs(model.config, grids, seed=9)
    keep = torch.arange(16, 48)  # image 0 loses everything
    out = model(pixel_values, grid, keep_indices=keep)
    assert out.last_hidden_state.shape == (32, 32) and out.pooler_output is None
    keep = torch.arange(16, 32)  # image 0 and frame 1 of image 1 lose everything
    assert model(pixel_values, grid, keep_indices=keep).last_hidden_state.shape == (16, 32)

    head = tiny_model(seed=9, vision_use_head=True, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=8)
    with pytest.raises(ValueError, match=r"\[0\]"):
        head(pixel_values, grid, keep_indices=torch.arange(16, 48))
    # an image that keeps everything pools as if alone, whatever the other image lost
    keep = torch.cat([torch.arange(0, 16), torch.arange(20, 28), torch.arange(36, 48)])
    pooled = head(pixel_values, grid, keep_indices=keep).pooler_output
    assert pooled.shape == (2, 32)
    alone = head(pixel_values[:16], [(1, 4, 4)]).pooler_output
    torch.testing.assert_close(pooled[0], alone[0], atol=1e-5, rtol=0)


def test_only_kept_tokens_are_embedded_and_encoded():
    """Dropping must change cost (NaViT §3.2): no projection in the forward (patch embedding, q/k/v/out, MLP) sees
    more than the K kept token rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    token_ops = {"mm", "addmm", "linear", "convolution"}  # patch embedding, q/k/v/out projections, MLP

    class RowsSeen(TorchDispatchMode):
        rows = 0
        ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in token_ops:
                RowsSeen.ops.add(name)
                for a in args:
                    if isinstance(a, torch.Tensor):
                        RowsSeen.rows = max(RowsSeen.rows, a.numel() // a.shape[-1] if a.dim() else 0)
            return func(*args, **(kwargs or {}))

    grids = [(1, 16, 16), (2, 8, 12)]
    for name in ("full-p2-s2-T1", "windowed-p2-s2-T2"):
        model = model_for(name)
        pixel_values, grid = packed_inputs(model.config, grids, seed=18)
        n = pixel_values.shape[0]
        keep = model.sample_keep_indices(grid, 0.5, torch.Generator().manual_seed(18))
        RowsSeen.rows = 0
        with torch.no_grad(), RowsSeen():
            model(pixel_values, grid, keep_indices=keep)
        assert RowsSeen.ops & {"mm", "addmm", "linear"}, RowsSeen.ops
        assert RowsSeen.rows <= len(keep) < 0.6 * n, (name, RowsSeen.rows, len(keep), n)
        RowsSeen.rows = 0
        with torch.no_grad(), RowsSeen():  # the probe sees N rows without dropping
            model(pixel_values, grid)
        assert RowsSeen.rows == n


def test_output_attentions_with_dropping_cover_only_kept_tokens():
    model = model_for("full-p2-s2-T1", "eager")
    grids = [(1, 4, 6)]
    pixel_values, grid = packed_inputs(model.config, grids, seed=10)
    keep = torch.tensor(sorted(r for g in block_rows(grids, 2)[0][1:4] for r in g))  # 3 blocks = 12 tokens
    out = model(pixel_values, grid, keep_indices=keep, output_attentions=True)
    for layer_maps in out.attentions:
        assert len(layer_maps) == 1 and layer_maps[0].shape == (model.config.num_attention_heads, 12, 12)
        torch.testing.assert_close(layer_maps[0].sum(-1), torch.ones(model.config.num_attention_heads, 12))


# ---------------------------------------------------------------------------------------------------------------------
# keep_indices / sample_keep_indices: errors
# ---------------------------------------------------------------------------------------------------------------------

BAD_KEEP = {
    "not block-aligned (part of a group)": (torch.tensor([0, 1, 2]), "whole"),
    "not block-aligned (shifted group)": (torch.tensor([1, 2, 3, 4]), "whole"),
    "out of range (high)": (torch.tensor([28, 29, 30, 31, 32, 33, 34, 35]), "lie in"),
    "out of range (negative)": (torch.tensor([-4, -3, -2, -1]), "lie in"),
    "unsorted": (torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]), "increasing"),
    "duplicate": (torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), "increasing"),
    "float": (torch.arange(4.0), "integers"),
    "bool mask": (torch.ones(32, dtype=torch.bool), "integers"),
    "2-D": (torch.arange(8).view(2, 4), "1-D"),
    "empty": (torch.zeros(0, dtype=torch.long), "empty"),
}


@pytest.mark.parametrize("case", list(BAD_KEEP))
def test_bad_keep_indices_raise_value_error_before_compute(case, monkeypatch):
    keep, message = BAD_KEEP[case]
    model = tiny_model()
    pixel_values, grid = packed_inputs(model.config, [(1, 4, 4), (1, 2, 8)])  # 32 rows

    def no_compute(*args, **kwargs):
        raise AssertionError("compute started before keep_indices was validated")

    monkeypatch.setattr(model.vision_model, "forward", no_compute)
    with pytest.raises(ValueError, match=message):
        model(pixel_values, grid, keep_indices=keep)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_keep_indices_of_any_integer_dtype_and_stride_one_single_tokens_are_accepted(dtype):
    """Row positions, whatever their integer dtype (uint8 is never read as a boolean mask)."""
    model = model_for("windowed-p2-s1-bilinear-aa")  # s = 1: any strictly increasing subset is whole groups
    grids = [(1, 3, 5), (2, 2, 3)]
    pixel_values, grid = packed_inputs(model.config, grids, seed=11)
    keep = [0, 4, 7, 14, 16, 20, 26]
    got = model(pixel_values, grid, keep_indices=torch.tensor(keep, dtype=dtype)).last_hidden_state
    want, _ = reference_forward(model, pixel_values, grids, keep)
    assert max_abs(got, want) <= 1e-4


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_sample_keep_indices_rejects_bad_rates(rate):
    with pytest.raises(ValueError, match="drop_rate"):
        model_for("full-p2-s2-T1").sample_keep_indices([(1, 4, 4)], rate)


@pytest.mark.parametrize("grid", [[(1, 3, 4)], [(0, 4, 4)], [(1, 4)], [(1.0, 4.0, 4.0)]])
def test_sample_keep_indices_rejects_bad_grids(grid):
    with pytest.raises(ValueError):
        model_for("full-p2-s2-T1").sample_keep_indices(torch.tensor(grid) if isinstance(grid[0][0], float) else grid, 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# sample_keep_indices: the NaViT sampler
# ---------------------------------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(batch=batches(), rate=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_sample_keep_indices_properties(batch, rate, seed):
    name, grids, _ = batch
    model = model_for(name)
    s = model.config.hidden_stride
    keep = model.sample_keep_indices(np.array(grids), rate, generator=torch.Generator().manual_seed(seed))
    assert keep.dtype == torch.int64 and keep.dim() == 1 and keep.device.type == "cpu"
    assert bool((keep[1:] > keep[:-1]).all())
    kept = set(keep.tolist())
    for groups in block_rows(grids, s):
        n_groups = len(groups)
        whole = [g for g in groups if set(g) <= kept]
        partial = [g for g in groups if set(g) & kept and not set(g) <= kept]
        assert not partial
        expected_keep = max(1, n_groups - round(rate * n_groups))
        assert len(whole) == expected_keep
    assert len(kept) == len(keep)
    again = model.sample_keep_indices(torch.tensor(grids), rate, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again, keep)
    # and the model accepts it
    pixel_values, grid = packed_inputs(model.config, grids, seed)
    assert model(pixel_values, grid, keep_indices=keep).last_hidden_state.shape[0] == len(keep)


def test_sample_keep_indices_seeds_and_global_rng():
    model = model_for("full-p2-s2-T1")
    grids = [(1, 16, 16), (2, 8, 12)]
    draws = {tuple(model.sample_keep_indices(grids, 0.5, torch.Generator().manual_seed(seed)).tolist()) for seed in range(5)}
    assert len(draws) == 5
    torch.manual_seed(123)
    a = model.sample_keep_indices(grids, 0.5)
    torch.manual_seed(123)
    assert torch.equal(a, model.sample_keep_indices(grids, 0.5))
    # drop_rate 1 keeps exactly one group per frame; every group is kept about equally often
    counts = torch.zeros(64)
    for seed in range(200):
        keep = model.sample_keep_indices([(1, 16, 16)], 1.0, torch.Generator().manual_seed(seed))
        assert keep.numel() == 4 and keep[0] % 4 == 0
        counts[keep[0] // 4] += 1
    assert (counts > 0).sum() >= 40, counts  # 200 draws over 64 groups: not a fixed or narrow choice
    # a 0-d tensor rate is the same rate
    as_tensor = model.sample_keep_indices(grids, torch.tensor(0.5), torch.Generator().manual_seed(7))
    assert torch.equal(as_tensor, model.sample_keep_indices(grids, 0.5, torch.Generator().manual_seed(7)))


# ---------------------------------------------------------------------------------------------------------------------
# dtype / device / containers, together with dropping
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_cast_fp32_pixels_inside_with_dropping(dtype):
    fp32 = model_for("windowed-p2-s2-T2")
    half = tiny_model(seed=3, **CONFIGS["windowed-p2-s2-T2"]).to(dtype)
    pixel_values, grid = packed_inputs(fp32.config, GRIDS, seed=12)
    keep = fp32.sample_keep_indices(grid, 0.5, torch.Generator().manual_seed(12))
    out = half(pixel_values, grid, keep_indices=keep, output_hidden_states=True)
    assert out.last_hidden_state.dtype == dtype and all(h.dtype == dtype for h in out.hidden_states)
    # casting inside == the caller casting first
    pre_cast = half(pixel_values.to(dtype), grid, keep_indices=keep).last_hidden_state
    assert torch.equal(out.last_hidden_state, pre_cast)
    want = fp32(pixel_values, grid, keep_indices=keep).last_hidden_state
    rel = (out.last_hidden_state.float() - want).norm() / want.norm()
    assert rel < 3e-2, rel


def test_grid_containers_agree_with_dropping():
    model = model_for("windowed-p4-s2-T1")
    grids = [(1, 6, 10), (1, 4, 2), (2, 8, 8)]
    pixel_values, grid = packed_inputs(model.config, grids, seed=13)
    keep = model.sample_keep_indices(grid, 0.3, torch.Generator().manual_seed(13))
    want = model(pixel_values, grid, keep_indices=keep).last_hidden_state
    for g in (grids, np.array(grids), np.array(grids, dtype=np.int32), grid.int(), [list(x) for x in grids]):
        assert torch.equal(model(pixel_values, g, keep_indices=keep).last_hidden_state, want)
    assert torch.equal(model(pixel_values, grid, keep_indices=keep.int()).last_hidden_state, want)


def test_meta_init_to_empty_load_matches_with_dropping_and_windows():
    model = model_for("windowed-p2-s2-T2")
    with torch.device("meta"):
        empty = Siglip2NavitModel(model.config)
    assert empty.vision_model.embeddings.patch_embedding.weight.is_meta
    empty = empty.to_empty(device="cpu").eval().requires_grad_(False)  # as `model`: the same (fused) CPU path
    empty.load_state_dict(model.state_dict())
    pixel_values, grid = packed_inputs(model.config, GRIDS, seed=14)
    keep = model.sample_keep_indices(grid, 0.5, torch.Generator().manual_seed(14))
    for k in (None, keep):
        assert torch.equal(empty(pixel_values, grid, keep_indices=k).last_hidden_state,
                           model(pixel_values, grid, keep_indices=k).last_hidden_state)


def _pe_update_is_seen(update):
    """After a no-grad forward (which may cache resized PE tables), update the PE weight in place with `update`;
    the next forward must equal the reference computed from the new weights."""
    model = tiny_model(seed=15)
    grids = [(1, 6, 10)]
    pixel_values, grid = packed_inputs(model.config, grids, seed=15)
    weight = model.vision_model.embeddings.position_embedding.weight
    with torch.no_grad():
        model(pixel_values, grid)
        update(weight, torch.randn(weight.shape, generator=torch.Generator().manual_seed(15)))
        want, _ = reference_forward(model, pixel_values, grids)
        assert max_abs(model(pixel_values, grid).last_hidden_state, want) <= 1e-4


def test_pe_weight_updated_in_place_after_a_cached_forward_is_seen():
    _pe_update_is_seen(lambda weight, new: weight.copy_(new))  # load_state_dict, optimizers
    _pe_update_is_seen(lambda weight, new: weight.detach().mul_(0.5).add_(new))  # EMA through detach()


def test_pe_weight_updated_through_data_after_a_cached_forward_is_seen():
    _pe_update_is_seen(lambda weight, new: weight.data.mul_(0.5).add_(new))  # classic EMA: ema.data.mul_().add_()


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def _step_grads(model, pixel_values, grid, keep, target):
    model.zero_grad()
    out = model(pixel_values, grid, keep_indices=keep, output_hidden_states=True)
    loss = (out.last_hidden_state - target).square().mean() + 0.1 * out.hidden_states[-1].square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_dropping_and_windows_gives_same_step(use_reentrant):
    model = tiny_model(seed=16, num_hidden_layers=3, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=8)
    model.train()
    pixel_values, grid = packed_inputs(model.config, GRIDS, seed=16)
    keep = model.sample_keep_indices(grid, 0.5, torch.Generator().manual_seed(16))
    target = torch.randn(len(keep), model.config.hidden_size, generator=torch.Generator().manual_seed(16))
    plain_loss, plain = _step_grads(model, pixel_values, grid, keep, target)
    enable_checkpointing(model, use_reentrant)
    assert model.vision_model.encoder.gradient_checkpointing
    ckpt_loss, ckpt = _step_grads(model, pixel_values, grid, keep, target)
    assert torch.equal(ckpt_loss, plain_loss)
    assert plain.keys() == ckpt.keys() == {n for n, _ in model.named_parameters()}
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5)
        assert plain[name].abs().sum() > 0, name

    # the step itself: SGD on the checkpointed grads moves both copies identically
    other = tiny_model(seed=16, num_hidden_layers=3, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=8)
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), other.parameters()):
            p.sub_(0.1 * ckpt[name])
            q.sub_(0.1 * plain[name])
    model.eval(), other.eval()
    torch.testing.assert_close(model(pixel_values, grid).last_hidden_state, other(pixel_values, grid).last_hidden_state,
                               atol=1e-5, rtol=0)


def test_toy_objective_is_learnt_with_token_dropping():
    """Regress each image's brightness onto channel 0 of its mean-pooled features (no probe: only the encoder can
    learn it); 50 % of the tokens dropped afresh every step, windowed layers, gradient checkpointing on.
    20 Adam steps must halve the loss."""
    torch.manual_seed(17)
    model = tiny_model(seed=17, fullatt_block_indexes=[0], window_size=8).train()
    enable_checkpointing(model)
    grids = [(1, 8, 8), (1, 6, 10), (1, 4, 4), (1, 10, 6), (1, 12, 8), (1, 4, 8)]
    generator = torch.Generator().manual_seed(17)
    brightness = torch.linspace(-1, 1, len(grids))[torch.randperm(len(grids), generator=generator)]
    pixel_values, grid = packed_inputs(model.config, grids, seed=17)
    pixel_values = 0.3 * pixel_values + torch.repeat_interleave(brightness, torch.tensor([h * w for _, h, w in grids]))[:, None]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    losses = []
    for step in range(20):
        keep = model.sample_keep_indices(grid, 0.5, generator)
        out = model(pixel_values, grid, keep_indices=keep).last_hidden_state
        image_of_row = torch.repeat_interleave(torch.arange(len(grids)), torch.tensor([h * w for _, h, w in grids]))[keep]
        pooled = torch.zeros(len(grids), out.shape[1]).index_add_(0, image_of_row, out)
        pooled = pooled / torch.bincount(image_of_row, minlength=len(grids))[:, None]
        loss = (pooled[:, 0] - brightness).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_collated_samples_with_their_own_keep_indices_equal_per_sample_forwards():
    """DataLoader flow: each sample draws its keep_indices, collate_packed offsets them; one packed forward ==
    the per-sample forwards concatenated."""
    from siglip2_navit import image_processing_siglip2_navit as processing

    model = model_for("windowed-p2-s2-T2")
    generator = torch.Generator().manual_seed(19)
    samples = []
    for i, grids in enumerate([[(1, 6, 4)], [(2, 4, 8), (1, 2, 2)], [(1, 10, 6)]]):
        pixel_values, grid = packed_inputs(model.config, grids, seed=19 + i)
        keep = model.sample_keep_indices(grid, 0.5, generator) if i != 1 else None  # sample 1 keeps everything
        samples.append({"pixel_values": pixel_values, "grid_thws": grid, **({} if keep is None else {"keep_indices": keep})})
    batch = processing.collate_packed(samples)
    got = model(batch["pixel_values"], batch["grid_thws"], keep_indices=batch["keep_indices"]).last_hidden_state
    want = torch.cat([model(s["pixel_values"], s["grid_thws"], keep_indices=s.get("keep_indices")).last_hidden_state
                      for s in samples])
    assert max_abs(got, want) <= 1e-5
