# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The packed (NaViT) core shared by every encoder family: SigLIP2, AIMv2 and DINOv3 are thin files over this module.

Images of any size are packed into one sequence; this module knows nothing about a family's embeddings or blocks:

    pixel_values [N, C·T·p·p], grid_thws [n_images, 3]
      -> validate_inputs (host)      every error is raised here, before any compute
      -> build_packed_layout (host)  working order, token positions, attention partitions (`cu_seqlens`), windows,
                                     prefix-token slots (CLS/registers inside each frame's sequence), `keep_indices`
      -> family embeddings           patch rows [K, hidden] (+ prefix rows: `assemble_sequence`)
      -> PackedEncoder               the family's PackedEncoderLayer stack; attention per frame (or window) through
                                     one packed attention interface (eager / sdpa / flash_attention_2 / registered)
      -> restore_index               patch tokens back in input order

Attention never sees a dense mask over the packed batch: `flash_attention_2` runs varlen kernels on `cu_seqlens`,
`sdpa` uses torch's varlen kernel on CUDA or one `scaled_dot_product_attention` call per group of equal-length
sequences, `eager` does matmul + softmax per sequence (and can return the attention maps).
"""

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging


logger = logging.get_logger(__name__)

GridLike = Union[torch.Tensor, Sequence[Sequence[int]]]


# ----------------------------------------------------------------------------------------------------------------------
# Packed layout: everything about token positions and attention scopes, derived once per forward on the host.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class AttentionPartition:
    """How the K tokens of the working order split into independent attention sequences.

    Sequences (frames or windows) are contiguous in the working order; `cu_seqlens` delimits them. For kernels that
    need equal lengths, `batches` lists runs of `n` sequences of length `L` in the *grouped* order, which is the
    working order itself unless `regroup`, else `working[group_index]`.
    """

    cu_seqlens: torch.Tensor  # [n_seq + 1] int32, on the model's device
    cu_seqlens_host: torch.Tensor  # [n_seq + 1] int64, CPU: read without a device sync
    max_seqlen: int
    batches: tuple[tuple[int, int], ...]  # (seq_len, n_seqs) in grouped order
    regroup: bool  # whether equal-length sequences must be gathered together (else group_index is the identity)
    group_index: torch.Tensor  # [K] working -> grouped order, on device
    group_inverse: torch.Tensor  # [K] grouped -> working order, on device
    grouped_seq_order: tuple[int, ...]  # sequence ids in grouped order
    input_seq_order: tuple[int, ...] = ()  # sequence ids (working order) sorted by their frame / window in the input


@dataclass
class PackedLayout:
    """Host-side description of one packed batch (computed once per forward, shared by every layer).

    The encoder runs on S = K + F·P rows in the *working order*: frames sorted by kept-token count (stable), each
    frame one contiguous sequence `[its P prefix tokens, its patches]` (window-major inside the frame when layers are
    windowed). K patch tokens (all N rows unless `keep_indices` drops some), F frames, P prefix tokens per frame
    (DINOv3's CLS + registers; 0 for SigLIP2 and AIMv2).
    """

    token_rows: torch.Tensor  # [K] rows of pixel_values of the patches in working order, on device
    restore_index: torch.Tensor  # [K] sequence row of each patch in input order: hidden[restore_index] -> output
    positions: torch.Tensor  # [K, 2] (row, col) of each patch in working order, int64 on device
    grid_sizes: torch.Tensor  # [K, 2] (h, w) of the frame of each patch in working order, int64 on device
    full: AttentionPartition  # per frame, over the S sequence rows
    window: Optional[AttentionPartition]  # per window (None without windowed layers)
    image_token_counts: tuple[int, ...]  # output (patch) tokens per image
    frame_token_counts: tuple[int, ...]  # encoded patch tokens per frame
    frame_grids: tuple[tuple[int, int], ...]  # (h, w) of every frame, input order
    host_positions: torch.Tensor  # [K, 2] `positions` on the CPU (for family planning without a device sync)
    host_frame_ids: torch.Tensor  # [K] frame (input order) of each patch in working order, CPU
    num_prefix_tokens: int = 0
    sequence_index: Optional[torch.Tensor] = None  # [S] row of cat([patch rows K, prefix rows P]); None when P == 0
    prefix_index: Optional[torch.Tensor] = None  # [F, P] sequence rows of each frame's prefix tokens, input order
    family: Any = None  # what a family plans once per batch on top (e.g. SigLIP2's resized-PE indices)


def assemble_sequence(layout: PackedLayout, patch_rows: torch.Tensor, prefix_rows: torch.Tensor) -> torch.Tensor:
    """The encoder's sequence [S, ·] from `patch_rows` [K, ·] (working order) and the `prefix_rows` [P, ·] every frame
    starts with (one gather). Without prefix tokens it is `patch_rows` itself."""
    if layout.sequence_index is None:
        return patch_rows
    return torch.cat([patch_rows, prefix_rows.to(patch_rows.dtype)], dim=0)[layout.sequence_index]


def _batch_plan(seq_lens: Sequence[int]) -> tuple[tuple[tuple[int, int], ...], Optional[tuple[int, ...]]]:
    """Batches (seq_len, n_seqs) of equal-length sequences, and the sequence order that groups them (None: as is).

    Runs of consecutive equal-length sequences are batched without moving tokens; when a length appears in more than
    one run, the sequences of each length are gathered together (stable, so the order is recoverable).
    """
    runs: list[list[int]] = []
    for length in seq_lens:
        if runs and runs[-1][0] == length:
            runs[-1][1] += 1
        else:
            runs.append([length, 1])
    if len({length for length, _ in runs}) == len(runs):
        return tuple((length, n) for length, n in runs), None
    by_length: dict[int, list[int]] = {}
    for seq_id, length in enumerate(seq_lens):
        by_length.setdefault(length, []).append(seq_id)
    batches = tuple((length, len(ids)) for length, ids in by_length.items())
    return batches, tuple(seq_id for ids in by_length.values() for seq_id in ids)


def _never_specialize(*tensors: torch.Tensor) -> None:
    """Mark dim 0 as unbacked for torch.compile: a count that happens to be 1 or to equal another size in the first
    batch (one image, one window per frame) must not become a guard of the compiled graph. The graph never computes
    with these sizes: only the opaque attention op reads cu_seqlens."""
    mark_unbacked = getattr(getattr(torch._dynamo, "decorators", None), "mark_unbacked", None)
    if mark_unbacked is not None:
        for tensor in tensors:
            mark_unbacked(tensor, 0)


def _partition(segment_ids: torch.Tensor, device: torch.device) -> AttentionPartition:
    """Partition tokens by `segment_ids` (CPU; every segment is contiguous; ids number segments in input order)."""
    _, counts = torch.unique_consecutive(segment_ids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    input_seq_order = tuple(torch.argsort(segment_ids[starts], stable=True).tolist())
    return _partition_of_lengths(counts.tolist(), device, input_seq_order)


def _partition_of_lengths(
    seq_lens: list[int], device: torch.device, input_seq_order: tuple[int, ...] = ()
) -> AttentionPartition:
    """The partition of consecutive sequences of `seq_lens` tokens, with the gather that groups equal lengths."""
    cu = [0]
    for length in seq_lens:
        cu.append(cu[-1] + length)
    plan = _batch_plan(seq_lens)
    grouped_seq_order = plan[1]
    if grouped_seq_order is None:
        index = torch.arange(cu[-1])
    else:
        index = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in grouped_seq_order])
    cu_host = torch.tensor(cu, dtype=torch.int64)
    cu_seqlens = cu_host.to(device=device, dtype=torch.int32)
    _never_specialize(cu_seqlens, cu_host)
    return _partition_from_tensors(
        cu_seqlens,
        cu_host,
        index.to(device),
        torch.argsort(index).to(device),
        input_seq_order=input_seq_order,
        seq_lens=seq_lens,
        plan=plan,
    )


def _partition_from_tensors(
    cu_seqlens: torch.Tensor,
    cu_seqlens_host: torch.Tensor,
    group_index: torch.Tensor,
    group_inverse: torch.Tensor,
    input_seq_order: tuple[int, ...] = (),
    seq_lens: Optional[list[int]] = None,
    plan: Optional[tuple] = None,
) -> AttentionPartition:
    """The partition delimited by `cu_seqlens` (`seq_lens` and `plan`: its lengths and their `_batch_plan`, when the
    caller has them already); `group_index` must follow that plan."""
    if seq_lens is None:
        seq_lens = cu_seqlens_host.diff().tolist()
    batches, grouped_seq_order = plan if plan is not None else _batch_plan(seq_lens)
    return AttentionPartition(
        cu_seqlens=cu_seqlens,
        cu_seqlens_host=cu_seqlens_host,
        max_seqlen=max(seq_lens),
        batches=batches,
        regroup=grouped_seq_order is not None,
        group_index=group_index,
        group_inverse=group_inverse,
        grouped_seq_order=tuple(range(len(seq_lens))) if grouped_seq_order is None else grouped_seq_order,
        input_seq_order=input_seq_order,
    )


@dataclass
class AttentionBlock:
    """Consecutive whole sequences of a partition (tokens `start:end` of the working order), run together by the CPU
    block schedule; `partition` describes them with token offsets relative to `start`."""

    start: int
    end: int
    partition: AttentionPartition


def attention_blocks(partition: AttentionPartition, max_tokens: int) -> tuple[AttentionBlock, ...]:
    """Split `partition` into runs of consecutive whole sequences of at most `max_tokens` tokens (a longer sequence
    is a block of its own). Attention never crosses a sequence, so each block can run a whole layer on its own."""
    cu = partition.cu_seqlens_host.tolist()
    seq_lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    device = partition.cu_seqlens.device
    blocks, first = [], 0
    while first < len(seq_lens):
        last = first + 1
        while last < len(seq_lens) and cu[last + 1] - cu[first] <= max_tokens:
            last += 1
        blocks.append(AttentionBlock(cu[first], cu[last], _partition_of_lengths(seq_lens[first:last], device)))
        first = last
    return tuple(blocks)


def _token_coordinates(grids: Sequence[tuple[int, int, int]], stride: int, window_blocks: int):
    """(row, col, frame id, window id, image id) of every packed token, in the SPEC §3 order (CPU, int64)."""
    frame_h, frame_w, frame_image = [], [], []
    for image_id, (t, h, w) in enumerate(grids):
        frame_h += [h] * t
        frame_w += [w] * t
        frame_image += [image_id] * t
    frame_h_t = torch.tensor(frame_h)
    frame_w_t = torch.tensor(frame_w)
    frame_sizes = frame_h_t * frame_w_t
    frame_ids = torch.repeat_interleave(torch.arange(len(frame_h)), frame_sizes)
    frame_start = torch.cumsum(frame_sizes, 0) - frame_sizes
    within = torch.arange(int(frame_sizes.sum())) - frame_start[frame_ids]

    # within-frame index -> (block row, block col, row in block, col in block): blocks of stride×stride patches
    blocks_w = (frame_w_t // stride)[frame_ids]
    col_in_block = within % stride
    row_in_block = (within // stride) % stride
    block = within // (stride * stride)
    block_row, block_col = block // blocks_w, block % blocks_w
    rows = block_row * stride + row_in_block
    cols = block_col * stride + col_in_block

    # windows of window_blocks × window_blocks blocks, tiled from the top-left of each frame
    windows_w = (frame_w_t // stride + window_blocks - 1) // window_blocks
    windows_h = (frame_h_t // stride + window_blocks - 1) // window_blocks
    windows_per_frame = windows_w * windows_h
    window_start = torch.cumsum(windows_per_frame, 0) - windows_per_frame
    window_ids = (
        window_start[frame_ids] + (block_row // window_blocks) * windows_w[frame_ids] + block_col // window_blocks
    )
    image_ids = torch.tensor(frame_image)[frame_ids]
    return rows, cols, frame_ids, window_ids, image_ids



@torch.compiler.disable  # host-side planning: under torch.compile it runs eagerly instead of being traced per batch
def build_packed_layout(
    grids: Sequence[tuple[int, int, int]],
    stride: int,
    device: torch.device,
    keep_indices: Optional[torch.Tensor] = None,
    window_blocks: Optional[int] = None,
    num_prefix_tokens: int = 0,
) -> PackedLayout:
    """Derive the working order, token positions and attention partitions of a packed batch (host side, once).

    `window_blocks`: window side in stride×stride blocks when some layers attend within windows (None: none do).
    `num_prefix_tokens`: P tokens that open every frame's sequence (they never enter a window: use one or the other).
    """
    if window_blocks is not None and num_prefix_tokens:
        raise ValueError("Windowed attention layers and prefix tokens cannot be combined in one model.")
    rows, cols, frame_ids, window_ids, image_ids = _token_coordinates(grids, stride, window_blocks or 1)
    if keep_indices is not None:
        rows, cols, frame_ids = rows[keep_indices], cols[keep_indices], frame_ids[keep_indices]
        window_ids, image_ids = window_ids[keep_indices], image_ids[keep_indices]

    # The working order every layer runs in (the output is put back in input order once, at the end): frames sorted
    # by token count (stable), so that equal-length frames are adjacent and batch without regrouping tokens in any
    # full-attention layer; inside each frame window-major (Ovis/Qwen2.5-VL style), so that every window is
    # contiguous. Always a permutation tensor, even the identity: every batch has the same structure under compile.
    working = torch.argsort(window_ids, stable=True) if window_blocks is not None else torch.arange(frame_ids.shape[0])
    num_frames = sum(t for t, _, _ in grids)
    frame_counts = torch.bincount(frame_ids, minlength=num_frames)
    frame_order = torch.argsort(frame_counts, stable=True)  # frames in working order
    frame_rank = torch.empty(num_frames, dtype=torch.long)
    frame_rank[frame_order] = torch.arange(num_frames)
    working = working[torch.argsort(frame_rank[frame_ids[working]], stable=True)]
    rows, cols, frame_ids, window_ids = rows[working], cols[working], frame_ids[working], window_ids[working]
    token_rows = working if keep_indices is None else keep_indices[working]
    frame_grids = tuple((h, w) for t, h, w in grids for _ in range(t))
    frame_hw = torch.tensor(frame_grids)  # [F, 2]

    restore = torch.argsort(working)  # [K] working position of each patch, input order
    sequence_index = prefix_index = None
    segment_ids = frame_ids
    if num_prefix_tokens:
        sequence_index, prefix_index = _prefix_slots(frame_counts[frame_order], frame_order, num_prefix_tokens)
        restore = restore + num_prefix_tokens * (frame_rank[frame_ids[restore]] + 1)  # sequence rows, input order
        segment_ids = torch.repeat_interleave(frame_order, frame_counts[frame_order] + num_prefix_tokens)

    return PackedLayout(
        token_rows=token_rows.to(device),
        restore_index=restore.to(device),
        positions=torch.stack([rows, cols], dim=-1).to(device),
        grid_sizes=frame_hw[frame_ids].to(device),
        full=_partition(segment_ids, device),
        window=_partition(window_ids, device) if window_blocks is not None else None,
        image_token_counts=tuple(torch.bincount(image_ids, minlength=len(grids)).tolist()),
        frame_token_counts=tuple(frame_counts.tolist()),
        frame_grids=frame_grids,
        host_positions=torch.stack([rows, cols], dim=-1),
        host_frame_ids=frame_ids,
        num_prefix_tokens=num_prefix_tokens,
        sequence_index=None if sequence_index is None else sequence_index.to(device),
        prefix_index=None if prefix_index is None else prefix_index.to(device),
    )


def _prefix_slots(counts: torch.Tensor, frame_order: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence layout with `num_prefix` tokens opening every frame (frames in working order with `counts` patches):
    `sequence_index` [S] into cat([patches K, prefix P]) and `prefix_index` [F, P] (frames in input order)."""
    num_patches = int(counts.sum())
    lengths = counts + num_prefix
    seq_start = torch.cumsum(lengths, 0) - lengths  # [F] working order
    patch_start = torch.cumsum(counts, 0) - counts
    frame_of_row = torch.repeat_interleave(torch.arange(len(counts)), lengths)  # [S]
    offset = torch.arange(int(lengths.sum())) - seq_start[frame_of_row]
    sequence_index = torch.where(
        offset < num_prefix, num_patches + offset, patch_start[frame_of_row] + offset - num_prefix
    )
    prefix_index = torch.empty(len(counts), num_prefix, dtype=torch.long)
    prefix_index[frame_order] = seq_start[:, None] + torch.arange(num_prefix)
    return sequence_index, prefix_index


# ----------------------------------------------------------------------------------------------------------------------
# Configuration checks every family shares (the transformer's shape and the packed-input fields)
# ----------------------------------------------------------------------------------------------------------------------

PACKED_CONFIG_INTS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "patch_size",
    "temporal_patch_size",
    "image_size",
    "hidden_stride",
)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_packed_config(config, extra_ints: Sequence[str] = (), frames_per_patch: Optional[int] = None) -> None:
    """ValueError unless the fields every packed encoder has are consistent: positive integer sizes (plus
    `extra_ints`), `hidden_size` divisible by the heads, `cpu_block_tokens` a positive integer or None, and
    `temporal_patch_size == frames_per_patch` for families that embed single frames."""
    for name in (*PACKED_CONFIG_INTS, *extra_ints):
        value = getattr(config, name)
        if not is_int(value) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if frames_per_patch is not None and config.temporal_patch_size != frames_per_patch:
        raise ValueError(
            f"`temporal_patch_size` must be {frames_per_patch} ({type(config).__name__} embeds single frames), got "
            f"{config.temporal_patch_size!r}."
        )
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"`hidden_size` ({config.hidden_size}) must be divisible by `num_attention_heads` "
            f"({config.num_attention_heads})."
        )
    block = config.cpu_block_tokens
    if block is not None and (not is_int(block) or block <= 0):
        raise ValueError(f"`cpu_block_tokens` must be a positive integer or None, got {block!r}.")


# ----------------------------------------------------------------------------------------------------------------------
# Input validation: every inconsistency is a ValueError raised before any compute.
# ----------------------------------------------------------------------------------------------------------------------


def _grid_to_list(grid_thws: GridLike) -> list[tuple[int, int, int]]:
    if isinstance(grid_thws, torch.Tensor):
        grid = grid_thws
    else:
        try:
            grid = torch.as_tensor(grid_thws)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"`grid_thws` must be an integer array of shape [n_images, 3], got {grid_thws!r}.") from err
    if grid.numel() == 0:  # checked first: an empty list converts to a float tensor
        raise ValueError("`grid_thws` is empty: the batch must hold at least one image (one (t, h, w) row each).")
    if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool:
        raise ValueError(f"`grid_thws` must hold integers (t, h, w) in patch units, got dtype {grid.dtype}.")
    if grid.dim() != 2 or grid.shape[-1] != 3:
        raise ValueError(f"`grid_thws` must have shape [n_images, 3] (t, h, w per image), got {tuple(grid.shape)}.")
    return [tuple(int(v) for v in row) for row in grid.tolist()]  # the one host sync for the grid


def _check_grids(grids: Sequence[tuple[int, int, int]], stride: int) -> None:
    for i, (t, h, w) in enumerate(grids):
        if t <= 0 or h <= 0 or w <= 0:
            raise ValueError(f"`grid_thws[{i}]` = {(t, h, w)}: t, h and w must all be positive.")
        if h % stride or w % stride:
            raise ValueError(
                f"`grid_thws[{i}]` = {(t, h, w)}: h and w must be divisible by hidden_stride={stride} "
                "(tokens are ordered in hidden_stride × hidden_stride blocks)."
            )


@torch.compiler.disable  # host-side checks, like build_packed_layout
def validate_inputs(
    pixel_values: torch.Tensor,
    grid_thws: GridLike,
    config,
    keep_indices: Optional[torch.Tensor] = None,
) -> list[tuple[int, int, int]]:
    """Check packed inputs against the config (`num_channels`, `patch_size`, `hidden_stride`, `temporal_patch_size`);
    return `grid_thws` as a host list of (t, h, w)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    width = config.num_channels * config.temporal_patch_size * config.patch_size**2
    if pixel_values.dim() != 2:
        raise ValueError(
            f"`pixel_values` must be 2-D [num_patches, C·T·p·p = {width}] (packed patches), got shape "
            f"{tuple(pixel_values.shape)}."
        )
    if pixel_values.shape[1] != width:
        raise ValueError(
            f"`pixel_values` rows must have C·T·p·p = {config.num_channels}·{config.temporal_patch_size}·"
            f"{config.patch_size}·{config.patch_size} = {width} values, got {pixel_values.shape[1]}."
        )
    if not pixel_values.dtype.is_floating_point:
        raise ValueError(f"`pixel_values` must be a floating-point tensor, got dtype {pixel_values.dtype}.")
    if pixel_values.shape[0] == 0:
        raise ValueError("`pixel_values` is empty: the batch must hold at least one patch.")

    grids = _grid_to_list(grid_thws)
    stride = config.hidden_stride
    _check_grids(grids, stride)
    total = sum(t * h * w for t, h, w in grids)
    if total != pixel_values.shape[0]:
        raise ValueError(
            f"`grid_thws` describes Σ t·h·w = {total} patches but `pixel_values` has {pixel_values.shape[0]} rows."
        )
    if keep_indices is not None:
        _validate_keep_indices(keep_indices, total, stride)  # on the host copy made by the caller
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("`pixel_values` contains NaN or infinite values.")
    return grids


def _validate_keep_indices(keep_indices: torch.Tensor, total: int, stride: int) -> None:
    if not isinstance(keep_indices, torch.Tensor) or keep_indices.dim() != 1:
        raise ValueError("`keep_indices` must be a 1-D integer tensor of row positions into `pixel_values`.")
    if keep_indices.dtype.is_floating_point or keep_indices.dtype == torch.bool:
        raise ValueError(f"`keep_indices` must hold integers, got dtype {keep_indices.dtype}.")
    if keep_indices.numel() == 0:
        raise ValueError("`keep_indices` is empty: keep at least one token.")
    if int(keep_indices.min()) < 0 or int(keep_indices.max()) >= total:
        raise ValueError(f"`keep_indices` must lie in [0, {total}) (rows of `pixel_values`).")
    if keep_indices.numel() > 1 and not bool((keep_indices[1:] > keep_indices[:-1]).all()):
        raise ValueError("`keep_indices` must be strictly increasing (no repeats, input order).")
    group = stride * stride
    if group > 1:
        _, counts = torch.unique_consecutive(keep_indices // group, return_counts=True)
        if not bool((counts == group).all()):
            raise ValueError(
                f"`keep_indices` must keep whole {stride}×{stride} blocks (groups of {group} consecutive rows starting "
                f"at a multiple of {group}), so that the hidden_stride merger still sees complete blocks."
            )


# ----------------------------------------------------------------------------------------------------------------------
# Attention backends. Each takes packed q, k, v [K, heads, head_dim] and an AttentionPartition and returns
# (output [K, heads, head_dim], per-sequence attention maps or None).
# ----------------------------------------------------------------------------------------------------------------------


def _grouped_attention(query, key, value, partition, kernel):
    """Run `kernel` on each batch of equal-length sequences ([n, heads, L, head_dim] views); restore token order."""
    if partition.regroup:
        query, key, value = query[partition.group_index], key[partition.group_index], value[partition.group_index]
    heads, head_dim = query.shape[1], query.shape[2]
    outputs, weights = [], []
    start = 0
    for seq_len, n_seqs in partition.batches:
        end = start + seq_len * n_seqs

        def to_batch(x: torch.Tensor) -> torch.Tensor:
            return x[start:end].view(n_seqs, seq_len, heads, head_dim).transpose(1, 2)

        out, attn = kernel(to_batch(query), to_batch(key), to_batch(value))  # [n, heads, L, head_dim]
        outputs.append(out.transpose(1, 2).reshape(end - start, heads, head_dim))
        if attn is not None:
            weights.extend(attn.unbind(0))
        start = end
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    if partition.regroup:
        output = output[partition.group_inverse]
    if weights:  # back to sequence order
        ordered = [None] * len(weights)
        for position, seq_id in enumerate(partition.grouped_seq_order):
            ordered[seq_id] = weights[position]
        weights = ordered
    return output, (tuple(weights) if weights else None)


def eager_packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    partition: AttentionPartition,
    scaling: float,
    dropout: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
    """Reference backend: explicit matmul + float32 softmax per sequence; can return the attention maps."""

    def kernel(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [n, heads, L, L]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        return torch.matmul(probs, v), (probs if output_attentions else None)

    return _grouped_attention(query, key, value, partition, kernel)


def _load_torch_varlen() -> Optional[Callable]:
    """torch's bundled flash varlen kernel (torch >= 2.10, CUDA) as `fn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale)`,
    or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "scale" in inspect.signature(varlen_attn).parameters:  # torch >= 2.11
        return varlen_attn

    def varlen_attn_scaled(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
        """torch 2.10's kernel always scales by head_dim**-0.5: other scales are folded into the queries."""
        default = query.shape[-1] ** -0.5
        if scale is not None and not math.isclose(scale, default):
            query = query * (scale / default)
        return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)

    return varlen_attn_scaled


_TORCH_VARLEN = _load_torch_varlen()  # resolved at import: a constant for torch.compile, no per-layer introspection


def _torch_varlen_attention() -> Optional[Callable]:
    """torch's varlen kernel with a `scale` argument on every torch that has one (see `_load_torch_varlen`)."""
    return _TORCH_VARLEN


def _torch_varlen_usable(query: torch.Tensor, dropout: float) -> bool:
    """The varlen kernel runs half precision on CUDA, without dropout (it has none)."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and dropout == 0.0
        and _torch_varlen_attention() is not None
    )


def sdpa_packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    partition: AttentionPartition,
    scaling: float,
    dropout: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, None]:
    """torch varlen kernel on CUDA half precision; else one SDPA call per group of equal-length sequences."""
    if _torch_varlen_usable(query, dropout):
        cu = partition.cu_seqlens
        out = _torch_varlen_attention()(
            query, key, value, cu, cu, partition.max_seqlen, partition.max_seqlen, scale=scaling
        )
        return out, None

    def kernel(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling), None

    return _grouped_attention(query, key, value, partition, kernel)


_FLASH_VARLEN: dict[str, Callable] = {}


def _flash_attn_varlen_func() -> Callable:
    """Import `flash_attn.flash_attn_varlen_func` lazily (flash-attn is an optional dependency)."""
    if "fn" not in _FLASH_VARLEN:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as err:
            raise ImportError(
                "attn_implementation='flash_attention_2' needs the `flash-attn` package (pip install "
                "'siglip2-navit[flash]' or pip install flash-attn --no-build-isolation), or the `kernels` package "
                "for transformers' hub kernels. Use attn_implementation='sdpa' otherwise."
            ) from err
        _FLASH_VARLEN["fn"] = flash_attn_varlen_func
    return _FLASH_VARLEN["fn"]


def flash_packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    partition: AttentionPartition,
    scaling: float,
    dropout: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, None]:
    """flash-attn varlen kernel over the whole packed batch."""
    cu = partition.cu_seqlens
    max_len = partition.max_seqlen
    out = _flash_attn_varlen_func()(
        query, key, value, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling, causal=False
    )
    return out, None


def _registered_attention(name: str) -> Callable:
    """Adapt a function registered in transformers' AttentionInterface (e.g. a hub flash kernel) to packed inputs."""
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(name, sdpa_packed_attention)
    else:  # transformers 4.5x before get_interface
        interface = ALL_ATTENTION_FUNCTIONS[name]
    varlen = "flash" in name

    def packed(module, query, key, value, partition, scaling, dropout=0.0, output_attentions=False):
        if varlen:  # transformers' flash interface: [1, heads, K, head_dim] + cu_seq_lens kwargs
            out, _ = interface(
                module,
                query.transpose(0, 1).unsqueeze(0),
                key.transpose(0, 1).unsqueeze(0),
                value.transpose(0, 1).unsqueeze(0),
                attention_mask=None,
                dropout=dropout,
                scaling=scaling,
                is_causal=False,
                cu_seq_lens_q=partition.cu_seqlens,
                cu_seq_lens_k=partition.cu_seqlens,
                max_length_q=partition.max_seqlen,
                max_length_k=partition.max_seqlen,
            )
            return out.reshape(query.shape), None

        def kernel(q, k, v):
            out, weights = interface(module, q, k, v, attention_mask=None, dropout=dropout, scaling=scaling)
            return out.transpose(1, 2), weights  # interfaces return [n, L, heads, head_dim]

        return _grouped_attention(query, key, value, partition, kernel)

    return packed


PACKED_ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "eager": eager_packed_attention,
    "sdpa": sdpa_packed_attention,
    "flash_attention_2": flash_packed_attention,
}


def get_packed_attention_interface(attn_implementation: Optional[str]) -> Callable:
    """The packed attention function for `config._attn_implementation` (resolved once per forward)."""
    name = attn_implementation or "sdpa"
    if name in PACKED_ATTENTION_FUNCTIONS:
        return PACKED_ATTENTION_FUNCTIONS[name]
    try:
        return _registered_attention(name)
    except KeyError as err:
        raise ValueError(
            f"Unknown attn_implementation {name!r}: use 'sdpa', 'eager', 'flash_attention_2' or a function "
            "registered with transformers' AttentionInterface."
        ) from err


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile: the built-in backends as one opaque custom op
# ----------------------------------------------------------------------------------------------------------------------
# Traced as Python, the per-group loop of the backends bakes the batch's sequence lengths into the graph: one recompile
# per new batch composition. Under torch.compile, the built-in backends therefore run inside a custom op that takes
# only tensors, so the graph has symbolic shapes and no per-batch constants and one compiled graph serves every batch.
# The op re-derives the batching from a CPU copy of `cu_seqlens` (a few µs of host work per layer, never a device
# sync). Its backward is a second op that recomputes the attention under `torch.func.vjp` (like checkpointing the
# attention alone); that needs aten-only kernels without dropout, so flash-attn, torch's CUDA varlen kernel and
# attention dropout keep the traced path when autograd is on.


def _packed_attention_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_host: torch.Tensor,
    group_index: torch.Tensor,
    group_inverse: torch.Tensor,
    scaling: float,
    dropout: float,
    backend: str,
) -> torch.Tensor:
    """The forward op's eager body: rebuild the partition and run `backend` on it."""
    partition = _partition_from_tensors(cu_seqlens, cu_seqlens_host, group_index, group_inverse)
    output, _ = PACKED_ATTENTION_FUNCTIONS[backend](None, query, key, value, partition, scaling, dropout)
    return output


def _packed_attention_backward_kernel(
    grad_output: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_host: torch.Tensor,
    group_index: torch.Tensor,
    group_inverse: torch.Tensor,
    scaling: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op's eager body: recompute the attention under `torch.func.vjp` and pull `grad_output` back."""
    partition = _partition_from_tensors(cu_seqlens, cu_seqlens_host, group_index, group_inverse)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return PACKED_ATTENTION_FUNCTIONS[backend](None, q, k, v, partition, scaling, 0.0)[0]

    _, pull_back = torch.func.vjp(attention, query, key, value)
    return pull_back(grad_output)


def _register_packed_attention_op():
    """Register the forward and backward ops under names unique to this module (remote code can be loaded under
    several module names, or executed again); returns the forward op, differentiable."""
    base = "packed_attention_" + re.sub(r"\W", "_", __name__)
    name, suffix = base, 0
    while hasattr(torch.ops.siglip2_navit, name):  # this module executed again (reload): a fresh name
        suffix += 1
        name = f"{base}_{suffix}"
    forward = torch.library.custom_op(f"siglip2_navit::{name}", mutates_args=())(_packed_attention_kernel)
    backward = torch.library.custom_op(f"siglip2_navit::{name}_backward", mutates_args=())(
        _packed_attention_backward_kernel
    )

    @forward.register_fake
    def _(query, key, value, cu_seqlens, cu_seqlens_host, group_index, group_inverse, scaling, dropout, backend):
        return torch.empty_like(query)  # [K, heads, head_dim]

    @backward.register_fake
    def _(grad_output, query, key, value, cu_seqlens, cu_seqlens_host, group_index, group_inverse, scaling, backend):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    def setup_context(ctx, inputs, output):
        query, key, value, cu_seqlens, cu_seqlens_host, group_index, group_inverse, scaling, dropout, backend = inputs
        if dropout != 0.0:
            raise RuntimeError("The packed attention op has no backward with dropout (its mask is not kept).")
        ctx.save_for_backward(query, key, value, cu_seqlens, cu_seqlens_host, group_index, group_inverse)
        ctx.scaling, ctx.backend = scaling, backend

    def backward_formula(ctx, grad_output):
        grads = backward(grad_output.contiguous(), *ctx.saved_tensors, ctx.scaling, ctx.backend)
        return (*grads, None, None, None, None, None, None, None)

    forward.register_autograd(backward_formula, setup_context=setup_context)
    return forward


_PACKED_ATTENTION_OP = _register_packed_attention_op()


def _use_opaque_attention(name: str, hidden_states: torch.Tensor, dropout: float, output_attentions: bool) -> bool:
    """Whether a layer traced by torch.compile runs the attention through the opaque op (decided at trace time)."""
    if not torch.compiler.is_compiling() or output_attentions or name not in PACKED_ATTENTION_FUNCTIONS:
        return False
    if not torch.is_grad_enabled():
        return True
    # The backward recomputes the attention under torch.func.vjp: aten-only kernels, no dropout.
    return dropout == 0.0 and name != "flash_attention_2" and not _torch_varlen_usable(hidden_states, 0.0)


def _opaque_packed_attention(backend: str) -> Callable:
    """`backend` (a key of PACKED_ATTENTION_FUNCTIONS) behind the custom op, with the packed-attention signature."""

    def attention(module, query, key, value, partition, scaling, dropout=0.0, output_attentions=False):
        output = _PACKED_ATTENTION_OP(
            query,
            key,
            value,
            partition.cu_seqlens,
            partition.cu_seqlens_host,
            partition.group_index,
            partition.group_inverse,
            scaling,
            dropout,
            backend,
        )
        return output, None

    return attention


# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embedding (2D)

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k [K, heads, head_dim] in float32 and cast back."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [K, 1, head_dim]
    q, k = query.float(), key.float()
    q_rot = q * cos + rotate_half(q) * sin
    k_rot = k * cos + rotate_half(k) * sin
    return q_rot.to(query.dtype), k_rot.to(key.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# CPU block schedule: when inference runs block by block (whole sequences per block) instead of over all tokens
# ----------------------------------------------------------------------------------------------------------------------


# The CPU block schedule runs the MLP in pieces whose [piece, intermediate] activation stays below this size: glibc
# serves allocations below its mmap threshold (at most 32 MiB) from recycled heap memory, larger ones with fresh pages.
_MLP_PIECE_BYTES = 16 * 2**20


def _has_hooks(module: nn.Module) -> bool:
    """Whether forward hooks (own, global or accelerate's) could observe `module` or one of its submodules."""
    global_hooks = getattr(nn.modules.module, "_global_forward_hooks", None) or getattr(
        nn.modules.module, "_global_forward_pre_hooks", None
    )
    return bool(global_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in module.modules()
    )


def _cpu_block_tokens(config, tensor: torch.Tensor) -> Optional[int]:
    """Tokens per block when work on `tensor` runs the CPU block schedule (CPU inference: no autograd, not traced by
    torch.compile, `config.cpu_block_tokens` set), else None."""
    if (
        not config.cpu_block_tokens
        or tensor.device.type != "cpu"
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    ):
        return None
    return config.cpu_block_tokens



# ----------------------------------------------------------------------------------------------------------------------
# Modules every family builds on: self-attention over packed sequences, a residual block, the encoder loop
# ----------------------------------------------------------------------------------------------------------------------


class PackedPatchEmbedding(nn.Conv2d):
    """A family's patch embedding: Conv2d parameters (`[hidden, C·T, p, p]` + bias, the checkpoints' layout) applied
    to packed patch rows `[n, C·T·p·p]` as one matmul. A module call, so that hooks on `get_input_embeddings()` see it
    (e.g. `enable_input_require_grads` for adapters with reentrant gradient checkpointing)."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)  # [n, hidden]

    def patch_rows(self, pixel_values: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """The kept rows of `pixel_values` in working order, on this module's device and dtype: [K, C·T·p·p]."""
        return pixel_values.to(self.weight.device)[layout.token_rows].to(self.weight.dtype)


class PackedSelfAttention(nn.Module):
    """q/k/v projections + the packed attention interface; a family adds its output projection (under its own
    parameter name) and returns it from `project_output`."""

    def __init__(
        self, hidden_size: int, num_heads: int, dropout: float, bias: tuple[bool, bool, bool] = (True, True, True)
    ):
        super().__init__()
        self.embed_dim = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.is_causal = False
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias[0])
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=bias[1])
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=bias[2])

    def project_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        """The family's output projection of the attention output [S, hidden]."""
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]],
        partition: AttentionPartition,
        attention_interface: Callable,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """Attention of `hidden_states` [S, hidden] within each sequence of `partition`, output-projected, and the
        per-sequence maps when asked (eager)."""
        num_tokens = hidden_states.shape[0]
        shape = (num_tokens, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape)  # [S, heads, head_dim]
        key = self.k_proj(hidden_states).view(shape)
        value = self.v_proj(hidden_states).view(shape)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            partition,
            scaling=self.scale,
            dropout=self.dropout if self.training else 0.0,
            output_attentions=output_attentions,
        )
        return self.project_output(attn_output.reshape(num_tokens, self.embed_dim)), attn_weights  # [S, hidden]


class PackedEncoderLayer(nn.Module):
    """Residual block `x + attention_branch(x)`, then `x + mlp_branch(x)`; a family defines the two branches (norms,
    layer scales, MLP kind), this class runs them over the whole batch or, for CPU inference, block by block."""

    full_attention: bool = True  # False: the layer attends within windows
    mlp_width: int = 1  # widest per-token MLP activation (sizes the CPU block schedule's MLP pieces)

    def attention_branch(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]],
        partition: AttentionPartition,
        attention_interface: Callable,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        raise NotImplementedError

    def mlp_branch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]],
        partition: AttentionPartition,
        attention_interface: Callable,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        attn_output, attn_weights = self.attention_branch(
            hidden_states, position_embeddings, partition, attention_interface, output_attentions
        )
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp_branch(hidden_states)
        return hidden_states, attn_weights

    def forward_blocked(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]],
        blocks: Sequence[AttentionBlock],
        attention_interface: Callable,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """`forward` for inference (no autograd), computed block by block into `out` [S, hidden] (not `hidden_states`).

        Same math as `forward`: attention never crosses a block's sequences, and the MLP is token-wise, run in pieces
        whose [piece, mlp_width] activation stays below `_MLP_PIECE_BYTES`. Every intermediate is block-sized.
        """
        piece = max(1, _MLP_PIECE_BYTES // (self.mlp_width * hidden_states.element_size()))
        for block in blocks:
            rows = slice(block.start, block.end)
            residual = hidden_states[rows]  # [n, hidden]
            rope = None if position_embeddings is None else tuple(t[rows] for t in position_embeddings)
            attn_output, _ = self.attention_branch(residual, rope, block.partition, attention_interface)
            block_out = torch.add(residual, attn_output, out=out[rows])
            for chunk in block_out.split(piece):
                chunk.add_(self.mlp_branch(chunk))
        return out


class PackedEncoder(nn.Module):
    """The layer loop over the packed sequence: attention backend resolved once per forward (opaque op under
    torch.compile), gradient checkpointing, the CPU block schedule, hidden states and attention maps."""

    def __init__(self, config, layers: Sequence[PackedEncoderLayer]):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(layers)
        self.gradient_checkpointing = False

    def rotary_embeddings(self, layout: PackedLayout) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The family's rotary cos/sin [S, head_dim] for this batch (computed once per forward), or None."""
        return None

    def attention_interface(self, hidden_states: torch.Tensor, output_attentions: bool) -> Callable:
        """The packed attention function of `config._attn_implementation`, read at call time (runtime switching)."""
        implementation = self.config._attn_implementation
        if output_attentions and implementation != "eager":
            logger.warning_once(
                f"output_attentions=True needs the eager attention backend; running eager instead of "
                f"{implementation!r} for this call."
            )
            implementation = "eager"
        name = implementation or "sdpa"
        dropout = self.config.attention_dropout if self.training else 0.0
        if _use_opaque_attention(name, hidden_states, dropout, output_attentions):
            return _opaque_packed_attention(name)  # one graph for every batch composition
        return get_packed_attention_interface(implementation)

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: PackedLayout,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]], Optional[tuple]]:
        """Run all layers on `hidden_states` [S, hidden] in the layout's working order.

        Returns the last hidden state and (when asked) every layer's hidden states and attention maps, all in the
        working order; the caller restores the input order.
        """
        attention_interface = self.attention_interface(hidden_states, output_attentions)
        position_embeddings = self.rotary_embeddings(layout)
        blocks = self._cpu_blocks(hidden_states, layout, output_attentions)
        spare = None  # block schedule: a layer's output buffer is reused two layers later unless it is returned

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for index, layer in enumerate(self.layers):
            partition = layout.full if layer.full_attention else layout.window
            if blocks is not None:
                out = spare if spare is not None else torch.empty_like(hidden_states)
                spare = hidden_states if index > 0 and not output_hidden_states else None  # never the caller's input
                hidden_states = layer.forward_blocked(
                    hidden_states, position_embeddings, blocks[layer.full_attention], attention_interface, out
                )
                attn_weights = None
            elif self.gradient_checkpointing and self.training:
                hidden_states, attn_weights = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, position_embeddings, partition, attention_interface, output_attentions
                )
            else:
                hidden_states, attn_weights = layer(
                    hidden_states, position_embeddings, partition, attention_interface, output_attentions
                )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return hidden_states, all_hidden_states, all_attentions

    def encode_and_restore(
        self,
        hidden_states: torch.Tensor,
        layout: PackedLayout,
        final_norm: nn.Module,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[BaseModelOutput, torch.Tensor]:
        """Every family's tail after its embeddings: all layers on the sequence `hidden_states` [S, hidden] (working
        order), `final_norm` of its patch rows, and the outputs in input order; also the last sequence [S, hidden]
        (working order, prefix rows included)."""
        sequence, all_hidden_states, all_attentions = self(
            hidden_states, layout, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        last_hidden_state = final_norm_in_input_order(sequence, layout, final_norm, self.config)  # [K, hidden]
        encoded = restore_encoder_outputs(last_hidden_state, all_hidden_states, all_attentions, layout, self.layers)
        return encoded, sequence

    def _cpu_blocks(
        self, hidden_states: torch.Tensor, layout: PackedLayout, output_attentions: bool
    ) -> Optional[dict[bool, tuple[AttentionBlock, ...]]]:
        """The blocks of the CPU block schedule per attention kind (True: full), or None when this forward runs every
        op over all tokens: off (`cpu_block_tokens=None`), not CPU, autograd or training, attention maps asked,
        torch.compile tracing, or hooks on the layers (they would see blocks instead of the whole batch)."""
        max_tokens = _cpu_block_tokens(self.config, hidden_states)
        if max_tokens is None or self.training or output_attentions or _has_hooks(self.layers):
            return None
        blocks = {True: attention_blocks(layout.full, max_tokens)}
        if layout.window is not None:
            blocks[False] = attention_blocks(layout.window, max_tokens)
        return blocks


def final_norm_in_input_order(hidden_states: torch.Tensor, layout: PackedLayout, norm: nn.Module, config) -> torch.Tensor:
    """`norm` of the patch rows of `hidden_states` [S, hidden] (working order), in input order: [K, hidden]. CPU
    inference normalises in place, piece by piece (no second [K, hidden] temporary)."""
    restore = layout.restore_index
    piece = _cpu_block_tokens(config, hidden_states)
    if piece is None or _has_hooks(norm):
        return norm(hidden_states)[restore]
    output = hidden_states[restore]
    for rows in output.split(piece):
        rows.copy_(norm(rows))
    return output


def restore_encoder_outputs(
    last_hidden_state: torch.Tensor,
    all_hidden_states: Optional[tuple[torch.Tensor, ...]],
    all_attentions: Optional[tuple],
    layout: PackedLayout,
    layers: Sequence[PackedEncoderLayer],
) -> BaseModelOutput:
    """Wrap the encoder's outputs in input order: `last_hidden_state` (already restored), hidden states (patch rows),
    per-sequence attention maps (sequences sorted back by frame or window, tokens in input order)."""
    if all_hidden_states is not None:
        all_hidden_states = tuple(h[layout.restore_index] for h in all_hidden_states)
    if all_attentions is not None:
        all_attentions = tuple(
            _restore_attention_order(maps, layout, layers[i].full_attention) for i, maps in enumerate(all_attentions)
        )
    return BaseModelOutput(last_hidden_state=last_hidden_state, hidden_states=all_hidden_states, attentions=all_attentions)


def _restore_attention_order(maps: tuple, layout: PackedLayout, full_attention: bool) -> tuple:
    """Per-sequence maps of the working order -> input order: sequences sorted back by frame (or window), and inside
    each frame the prefix tokens first, then the patches (window-major in the working order) in input order."""
    partition = layout.full if full_attention else layout.window
    if not full_attention:  # inside a window, the working order keeps the input order
        return tuple(maps[i] for i in partition.input_seq_order)
    restored = []
    cu = partition.cu_seqlens_host.tolist()
    prefix = torch.arange(layout.num_prefix_tokens, device=layout.restore_index.device)
    output_start = 0  # frames are contiguous in the output, in input order
    for seq_id in partition.input_seq_order:
        length = cu[seq_id + 1] - cu[seq_id] - layout.num_prefix_tokens  # patches of this frame
        patches = layout.restore_index[output_start : output_start + length] - cu[seq_id]  # local sequence rows
        local = torch.cat([prefix, patches])
        restored.append(maps[seq_id][:, local][:, :, local])
        output_start += length
    return tuple(restored)


def per_image_groups(token_counts: Sequence[int]) -> dict[int, list[int]]:
    """Image ids grouped by token count (first-seen order): pooling heads batch equal-length images together."""
    groups: dict[int, list[int]] = {}
    for image_id, count in enumerate(token_counts):
        groups.setdefault(count, []).append(image_id)
    return groups


def segment_mean(rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Mean of consecutive segments of `rows` [Σ counts, D] -> [len(counts), D]."""
    return torch.stack([segment.mean(dim=0) for segment in rows.split(list(counts))])


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained-model base: attention switching, planning, token dropping, per-image features
# ----------------------------------------------------------------------------------------------------------------------


class PackedPreTrainedModel(PreTrainedModel):
    """What every packed family's PreTrainedModel shares. A family sets `config_class`, `base_model_prefix`,
    `_no_split_modules`, `_init_weights`, and may override `_layout_options` and `_plan_family`."""

    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Runtime switching always works: the backend is read from `config._attn_implementation` at every forward.
        (transformers 4.56-4.57 guess this from the source text, and their guess is wrong for these files.)"""
        return True

    if not hasattr(PreTrainedModel, "set_attn_implementation"):  # older transformers 4.5x have no runtime switch

        def set_attn_implementation(self, attn_implementation: str) -> None:
            """Switch the attention backend at runtime (the backend is read from the config at every forward)."""
            if attn_implementation not in PACKED_ATTENTION_FUNCTIONS:
                raise ValueError(
                    f"attn_implementation must be one of {sorted(PACKED_ATTENTION_FUNCTIONS)}, got {attn_implementation!r}."
                )
            if attn_implementation == "flash_attention_2":
                _flash_attn_varlen_func()  # a clear ImportError now rather than at the next forward
            self.config._attn_implementation = attn_implementation

    # -- planning (host side, once per forward) --
    def _layout_options(self) -> dict:
        """Keyword arguments of `build_packed_layout` for this model: `window_blocks`, `num_prefix_tokens`."""
        return {}

    def _plan_family(self, layout: PackedLayout, grids: Sequence[tuple[int, int, int]]) -> Any:
        """What the family derives once per batch on top of the layout (stored as `layout.family`)."""
        return None

    def _pools_per_image(self) -> bool:
        """Whether the model pools every image's tokens (then no frame may lose all its tokens)."""
        return False

    def _has_pooler(self) -> bool:
        """Whether `forward` returns a `pooler_output` (a pooling head, or DINOv3's CLS token)."""
        return self._pools_per_image()

    def _output_flags(self, output_hidden_states, output_attentions, return_dict) -> tuple[bool, bool, bool]:
        config = self.config
        return (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states,
            output_attentions if output_attentions is not None else config.output_attentions,
            return_dict if return_dict is not None else config.return_dict,
        )

    # torch.compile: this frame (argument handling, host-side planning) runs eagerly and `encode` (tensors only) is
    # what gets compiled, so the graph has no guards on `grid_thws` or on the batch's composition; pooling runs eagerly.
    @torch.compiler.disable(recursive=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thws: GridLike,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        keep_indices: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `[Σ t·h·w, C·T·p·p]`): packed patch rows (SPEC §3 order), any
                float dtype (cast to the model's dtype inside); may live on another device than the model.
            grid_thws (`torch.LongTensor` / list / array of shape `[n_images, 3]`): (t, h, w) per image in patches;
                may live on any device.
            output_hidden_states (`bool`, *optional*): also return the embedding output and every layer's output
                (patch tokens, input order, before the final norm).
            output_attentions (`bool`, *optional*): per-layer tuples of per-sequence maps `[heads, L, L]` (eager).
            return_dict (`bool`, *optional*): a `ModelOutput` (default) or a plain tuple.
            keep_indices (`torch.LongTensor` of shape `[K]`, *optional*): strictly increasing rows to keep (NaViT
                token dropping, whole hidden_stride blocks; prefix tokens are always kept); outputs then have K rows.
            kwargs: the family's own inputs (`_family_inputs`); anything else is a `ValueError`.
        """
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        layout = self.plan(pixel_values, grid_thws, keep_indices)
        family_inputs = self._family_inputs(pixel_values, kwargs)
        encoded = self.encode(pixel_values, layout, output_attentions, output_hidden_states, **family_inputs)
        return self._wrap_outputs(encoded, layout, return_dict)

    def _family_inputs(self, pixel_values: torch.Tensor, kwargs: dict) -> dict:
        """Check and return the family's extra `forward` inputs (host side, before any compute)."""
        if kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)} for {type(self).__name__}.forward.")
        return {}

    def encode(
        self, pixel_values: torch.Tensor, layout: PackedLayout, output_attentions: bool, output_hidden_states: bool
    ) -> BaseModelOutput:
        """Embeddings, encoder layers and the final norm of a planned batch, outputs in input order (the part
        torch.compile traces: tensors only)."""
        raise NotImplementedError

    def wrap_outputs(self, encoded: BaseModelOutput, layout: PackedLayout, return_dict: bool):
        """The model output from `encode`'s: pooling and extra fields (runs eagerly)."""
        raise NotImplementedError

    @torch.compiler.disable  # eager: pooled [n_images, ·] outputs never become graph inputs guarded on their size
    def _wrap_outputs(self, encoded: BaseModelOutput, layout: PackedLayout, return_dict: bool):
        return self.wrap_outputs(encoded, layout, return_dict)

    @torch.compiler.disable  # host-side planning is never traced: torch.compile would specialize on the batch
    def plan(
        self, pixel_values: torch.Tensor, grid_thws: GridLike, keep_indices: Optional[torch.Tensor] = None
    ) -> PackedLayout:
        """Validate the packed inputs and derive their `PackedLayout` (host side, once per forward)."""
        if isinstance(keep_indices, torch.Tensor):
            keep_indices = keep_indices.cpu()  # planned on the host, like grid_thws
        grids = validate_inputs(pixel_values, grid_thws, self.config, keep_indices)
        if keep_indices is not None:
            keep_indices = keep_indices.long()  # any integer dtype (uint8 would otherwise index as a mask)
        device = self.get_input_embeddings().weight.device
        layout = build_packed_layout(grids, self.config.hidden_stride, device, keep_indices, **self._layout_options())
        if self._pools_per_image() and 0 in layout.frame_token_counts:
            empty = [i for i, n in enumerate(layout.frame_token_counts) if n == 0]
            raise ValueError(
                f"Frames {empty} (counted over all images) keep no tokens, so the pooled output of their image is "
                "undefined (the model has a pooling head): keep at least one block per frame."
            )
        layout.family = self._plan_family(layout, grids)
        return layout

    def sample_keep_indices(
        self, grid_thws: GridLike, drop_rate: float, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """NaViT token dropping: drop `round(drop_rate · groups)` random hidden_stride×hidden_stride groups per frame.

        At least one group per frame is kept (prefix tokens such as CLS are never dropped). Returns sorted row indices
        into the packed batch (CPU int64), ready for `forward(..., keep_indices=...)`; pass a seeded
        `torch.Generator` for reproducible draws.
        """
        drop_rate = float(drop_rate)  # a Python number or a 0-d tensor
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"`drop_rate` must be in [0, 1], got {drop_rate}.")
        stride = self.config.hidden_stride
        group = stride * stride
        grids = _grid_to_list(grid_thws)
        _check_grids(grids, stride)
        kept, offset = [], 0
        for t, h, w in grids:
            groups = (h // stride) * (w // stride)
            n_keep = max(1, groups - round(drop_rate * groups))
            for _ in range(t):
                device = "cpu" if generator is None else generator.device  # a CUDA generator draws on its device
                chosen = torch.randperm(groups, generator=generator, device=device)[:n_keep].sort().values.cpu()
                kept.append((offset + chosen[:, None] * group + torch.arange(group)).flatten())
                offset += groups * group
        return torch.cat(kept)

    def get_image_features(self, pixel_values: torch.Tensor, grid_thws: GridLike, **kwargs) -> torch.Tensor:
        """One embedding per image, `[n_images, hidden]`: the model's `pooler_output` when it has one (SigLIP2/AIMv2
        attention-pooling head; DINOv3's CLS token, averaged over the frames of a video), else the mean of the image's
        `last_hidden_state` tokens (after the final norm)."""
        grids = _grid_to_list(grid_thws)
        counts = [t * h * w for t, h, w in grids]  # tokens per image in last_hidden_state
        keep_indices = kwargs.get("keep_indices")
        if keep_indices is not None and not self._has_pooler():
            if not isinstance(keep_indices, torch.Tensor):
                raise ValueError("`keep_indices` must be a 1-D integer tensor of row positions into `pixel_values`.")
            image_ids = torch.searchsorted(torch.tensor(counts).cumsum(0), keep_indices.cpu().long(), right=True)
            counts = torch.bincount(image_ids, minlength=len(grids)).tolist()
            if 0 in counts:  # before any compute
                raise ValueError(
                    f"Images {[i for i, n in enumerate(counts) if n == 0]} keep no tokens, so their mean embedding is "
                    "undefined: keep at least one block of every image."
                )
        outputs = self(pixel_values, grid_thws, return_dict=True, **kwargs)
        pooled = outputs.pooler_output
        if pooled is None:
            return segment_mean(outputs.last_hidden_state, counts)
        frames = [t for t, _, _ in grids]
        if pooled.shape[0] == sum(frames) and pooled.shape[0] != len(grids):  # one row per frame: average each video
            return segment_mean(pooled, frames)
        return pooled
