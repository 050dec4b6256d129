"""The shared packed core (navit_core.py) on its own: the layout with prefix tokens (DINOv3's CLS + registers inside
every frame's sequence), checked against a plain construction of the layout (prefix tokens first), and a toy
attention model whose packed result must equal running each frame alone."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from siglip2_navit import navit_core as core


def spec_frames(grids, keep=None):
    """Per frame (input order): its kept patches as packed row numbers (frames follow each other)."""
    frames, row = [], 0
    for t, h, w in grids:
        for _ in range(t):
            rows = list(range(row, row + h * w))
            row += h * w
            if keep is not None:
                rows = [r for r in rows if r in keep]
            frames.append(rows)
    return frames


def check_layout(grids, stride, num_prefix, keep=None):
    keep_tensor = None if keep is None else torch.tensor(sorted(keep))
    layout = core.build_packed_layout(grids, stride, torch.device("cpu"), keep_tensor, num_prefix_tokens=num_prefix)
    frames = spec_frames(grids, None if keep is None else set(keep))
    num_patches = sum(len(f) for f in frames)
    labels = layout.token_rows + 100  # [K] label of each working-order patch: 100 + its pixel row
    prefix_labels = -torch.arange(1, num_prefix + 1)  # prefix slot j is labelled -(j + 1)
    sequence = core.assemble_sequence(layout, labels[:, None], prefix_labels[:, None])[:, 0]  # [S]
    assert sequence.shape[0] == num_patches + num_prefix * len(frames)

    # every sequence of the partition is one frame: its prefix in order, then exactly that frame's kept patches
    cu = layout.full.cu_seqlens_host.tolist()
    by_frame = {}
    for seq_id in range(len(cu) - 1):
        seq = sequence[cu[seq_id] : cu[seq_id + 1]].tolist()
        assert seq[:num_prefix] == prefix_labels.tolist()
        pixel_rows = sorted(v - 100 for v in seq[num_prefix:])
        frame = next(i for i, f in enumerate(frames) if f == pixel_rows and i not in by_frame)
        by_frame[frame] = seq_id
    assert sorted(by_frame) == list(range(len(frames)))  # every frame once, empty ones too (they keep their prefix)
    assert [by_frame[i] for i in range(len(frames))] == list(layout.full.input_seq_order)

    # restore_index reads the patches back in input order; prefix_index finds each frame's prefix
    kept_rows = sorted(keep) if keep is not None else list(range(num_patches))
    assert (sequence[layout.restore_index] - 100).tolist() == kept_rows
    assert layout.prefix_index.shape == (len(frames), num_prefix)
    for frame, seq_id in by_frame.items():
        assert layout.prefix_index[frame].tolist() == list(range(cu[seq_id], cu[seq_id] + num_prefix))
    assert list(layout.frame_token_counts) == [len(f) for f in frames]
    return layout


@settings(max_examples=40, deadline=None)
@given(
    grids=st.lists(
        st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=4
    ),
    stride=st.sampled_from([1, 2]),
    num_prefix=st.integers(1, 5),
    data=st.data(),
)
def test_prefix_layout_matches_a_plain_construction(grids, stride, num_prefix, data):
    grids = [(t, h * stride, w * stride) for t, h, w in grids]
    total = sum(t * h * w for t, h, w in grids)
    keep = None
    if data.draw(st.booleans()):  # drop whole stride×stride groups, possibly whole frames
        groups = total // (stride * stride)
        kept_groups = data.draw(st.sets(st.integers(0, groups - 1), min_size=1))
        keep = {g * stride * stride + i for g in kept_groups for i in range(stride * stride)}
    check_layout(grids, stride, num_prefix, keep)


def test_no_prefix_layout_has_no_sequence_index():
    layout = core.build_packed_layout([(1, 2, 4), (2, 2, 2)], 2, torch.device("cpu"))
    assert layout.sequence_index is None and layout.prefix_index is None
    rows = torch.randn(16, 3)
    assert core.assemble_sequence(layout, rows, torch.zeros(0, 3)) is rows


def test_prefix_tokens_and_windows_are_refused():
    with pytest.raises(ValueError, match="prefix tokens"):
        core.build_packed_layout([(1, 4, 4)], 2, torch.device("cpu"), window_blocks=1, num_prefix_tokens=1)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_prefix_sequences_attend_exactly_within_their_frame(backend):
    """Packed attention over [prefix, patches] sequences equals attention over each frame's own sequence, including a
    frame whose patches were all dropped (its prefix attends only to itself)."""
    torch.manual_seed(0)
    grids = [(1, 2, 4), (2, 2, 2), (1, 4, 2)]
    keep = torch.tensor([i for i in range(8 + 8 + 8) if not 8 <= i < 12])  # frame 1 (image 1, t=0) loses everything
    layout = core.build_packed_layout(grids, 2, torch.device("cpu"), keep, num_prefix_tokens=2)
    heads, dim = 2, 4
    patches = torch.randn(keep.numel(), heads * dim)  # by kept row, input order
    prefix = torch.randn(2, heads * dim)
    working = patches[torch.argsort(torch.argsort(layout.token_rows))]  # kept rows ranked = working order
    sequence = core.assemble_sequence(layout, working, prefix)
    q, k, v = ((sequence * s).view(-1, heads, dim) for s in (1.0, 0.5, -1.0))
    out, _ = core.PACKED_ATTENTION_FUNCTIONS[backend](None, q, k, v, layout.full, dim**-0.5)
    out = out.reshape(-1, heads * dim)

    # reference: each frame alone, [prefix, its kept patches in input order]
    bounds, start = [], 0
    for t, h, w in grids:
        for _ in range(t):
            bounds.append((start, start + h * w))
            start += h * w
    kept = keep.tolist()
    position = 0
    for frame, (a, b) in enumerate(bounds):
        n = sum(a <= r < b for r in kept)
        x = torch.cat([prefix, patches[position : position + n]])
        qf, kf, vf = ((x * s).view(-1, heads, dim).transpose(0, 1) for s in (1.0, 0.5, -1.0))
        expected = torch.softmax(qf @ kf.transpose(-1, -2) * dim**-0.5, -1) @ vf  # [heads, L, dim]
        expected = expected.transpose(0, 1).reshape(-1, heads * dim)
        torch.testing.assert_close(out[layout.prefix_index[frame]], expected[:2])
        torch.testing.assert_close(out[layout.restore_index[position : position + n]], expected[2:])
        position += n


def test_split_per_image_follows_grid_thws_and_refuses_other_row_counts():
    """Rows of a packed output go to images in input order, t·h·w rows each (a video: all its frames)."""
    grids = torch.tensor([[1, 2, 4], [2, 2, 2], [1, 6, 2]])  # 8, 8 and 12 rows
    rows = torch.arange(28 * 3, dtype=torch.float32).view(28, 3)
    pieces = core.split_per_image(rows, grids)
    assert [p.shape[0] for p in pieces] == [8, 8, 12]
    torch.testing.assert_close(pieces[1], rows[8:16], rtol=0, atol=0)
    torch.testing.assert_close(pieces[2], rows[16:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="27 rows.*28 patches"):
        core.split_per_image(rows[:27], grids)
