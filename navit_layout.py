# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The packed layout every family shares: token positions and attention scopes, derived once per forward on the host.

    pixel_values [N, C·T·p·p], grid_thws [n_images, 3]
      -> validate_inputs        every inconsistency is a ValueError raised here, before any compute
      -> build_packed_layout    working order, token positions, attention partitions (`cu_seqlens`), windows,
                                prefix-token slots (CLS/registers inside each frame's sequence), `keep_indices`

Also the configuration checks every family shares (`validate_packed_config`).
"""

import math
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, Sequence, TypeVar, Union

import torch

from .navit_image_utils import block_order_position


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
class FamilyPlan:
    """What a family derives once per batch on top of the layout, stored as `PackedLayout.family`.

    Planned on the host before any compute (`PackedPreTrainedModel._plan_family`); a family subclasses this dataclass
    with its own fields (tensors already on the model's device), e.g. SigLIP2's resized-PE indices, AIMv2's sin-cos
    table, DINOv3's image of every patch. This base class, with no fields, is the plan of a family that needs none.
    """


PlanT = TypeVar("PlanT", bound=FamilyPlan)


@dataclass
class PackedLayout(Generic[PlanT]):
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
    family: PlanT = field(default_factory=FamilyPlan)  # the family's plan (`FamilyPlan` subclass) for this batch


def assemble_sequence(layout: PackedLayout, patch_rows: torch.Tensor, prefix_rows: torch.Tensor) -> torch.Tensor:
    """The encoder's sequence [S, ·] from `patch_rows` [K, ·] (working order) and the `prefix_rows` [P, ·] every frame
    starts with (one gather). Without prefix tokens it is `patch_rows` itself."""
    if layout.sequence_index is None:
        return patch_rows
    return torch.cat([patch_rows, prefix_rows.to(patch_rows.dtype)], dim=0).index_select(0, layout.sequence_index)


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


def never_specialize(*tensors: torch.Tensor) -> None:
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
    never_specialize(cu_seqlens, cu_host)
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
    """(row, col, frame id, window id, image id) of every packed token, in packed order: per frame, its
    `stride x stride` blocks in raster order, each block's patches in raster order (CPU, int64)."""
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

    # within-frame packed index -> (row, col) in the frame: stride x stride blocks
    rows, cols = block_order_position(within, frame_w_t[frame_ids], stride)
    block_row, block_col = rows // stride, cols // stride

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
# Upper bounds of the sizes, far above any released encoder (so400m: width 1152, 27 layers; the largest ViTs: width
# 6144-8192, 48-64 layers): a config beyond them is a typo or an attack (a 1e5-layer model would hang the machine while
# it is built), refused before any weight is allocated.
MAX_CONFIG_INTS = {
    "hidden_size": 32768,
    "intermediate_size": 131072,
    "num_hidden_layers": 512,
    "num_attention_heads": 512,
    "num_channels": 16,
    "patch_size": 256,
    "temporal_patch_size": 16,
    "image_size": 16384,
    "hidden_stride": 16,
}
MAX_CONFIG_INT = 1 << 20  # any other integer size (e.g. window_size in pixels)
# dtypes a model may be loaded in (config `dtype` / `torch_dtype`); float8 has no kernels for this encoder
ALLOWED_DTYPES = ("float32", "float16", "bfloat16", "auto")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite real number (an int or a float; a bool or a string is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_packed_config(
    config,
    extra_ints: Sequence[str] = (),
    frames_per_patch: Optional[int] = None,
    positive_floats: Sequence[str] = (),
    fractions: Sequence[str] = (),
    bools: Sequence[str] = (),
) -> None:
    """ValueError unless the fields every packed encoder has are consistent: positive integer sizes (plus
    `extra_ints`) within `MAX_CONFIG_INTS`, `hidden_size` divisible by the heads, `cpu_block_tokens` a positive
    integer or None, `temporal_patch_size == frames_per_patch` for families that embed single frames, a known
    `hidden_act`, a loadable `dtype`; and the family's `positive_floats` (eps, RoPE base: finite numbers > 0),
    `fractions` (dropout rates: numbers in [0, 1)) and `bools` (True or False; a string such as "no" is refused)."""
    from transformers.activations import ACT2FN

    for name in (*PACKED_CONFIG_INTS, *extra_ints):
        value = getattr(config, name)
        if not is_int(value) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        limit = MAX_CONFIG_INTS.get(name, MAX_CONFIG_INT)
        if value > limit:
            raise ValueError(f"`{name}` = {value} is larger than this encoder supports (at most {limit}).")
    for name in positive_floats:
        value = getattr(config, name)
        if not is_real(value) or value <= 0:
            raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    for name in fractions:
        value = getattr(config, name)
        if not is_real(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
    for name in bools:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be true or false, got {value!r} of type {type(value).__name__}.")
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACT2FN:
        raise ValueError(f"`hidden_act` must be one of transformers' activations (e.g. 'gelu'), got {config.hidden_act!r}.")
    _validate_dtype(config)
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
    auto_map = getattr(config, "auto_map", None)
    if auto_map is not None and not isinstance(auto_map, dict):
        raise ValueError(f"`auto_map` must be a mapping such as {{'AutoModel': 'module.Class'}}, got {auto_map!r}.")
    block = config.cpu_block_tokens
    if block is not None and (not is_int(block) or block <= 0):
        raise ValueError(f"`cpu_block_tokens` must be a positive integer or None, got {block!r}.")


def _validate_dtype(config) -> None:
    check_dtype_settings(config.__dict__)


def check_dtype_settings(settings: dict) -> None:
    """ValueError unless the `dtype` / `torch_dtype` entries of `settings` (a config's kwargs or attributes) name a
    dtype this encoder runs in. Configs call it on their kwargs before transformers turns a string into a
    `torch` attribute (an AttributeError for a name such as "evil")."""
    for name in ("dtype", "torch_dtype"):  # transformers >= 4.56 names it `dtype`
        value = settings.get(name)
        if value is None:
            continue
        text = str(value).replace("torch.", "")
        if text not in ALLOWED_DTYPES:
            raise ValueError(f"`{name}` must be one of {ALLOWED_DTYPES} (or None), got {value!r}.")


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


def split_per_image(rows: torch.Tensor, grid_thws: GridLike) -> tuple[torch.Tensor, ...]:
    """Cut a packed output ([Σ t·h·w, ...], one row per input patch, images in input order) into one tensor per image.

    The one place that knows how packed rows map to images: `last_hidden_state`, the pipeline's per-image features
    and the encode job's shards all split here.
    """
    counts = [t * h * w for t, h, w in _grid_to_list(grid_thws)]
    if rows.shape[0] != sum(counts):
        raise ValueError(
            f"The packed output has {rows.shape[0]} rows, but grid_thws describes {sum(counts)} patches "
            f"({counts} per image, t·h·w each): splitting per image needs one row per input patch."
        )
    return rows.split(counts, dim=0)


def _check_grids(grids: Sequence[tuple[int, int, int]], stride: int) -> None:
    for i, (t, h, w) in enumerate(grids):
        if t <= 0 or h <= 0 or w <= 0:
            raise ValueError(f"`grid_thws[{i}]` = {(t, h, w)}: t, h and w must all be positive.")
        if h % stride or w % stride:
            raise ValueError(
                f"`grid_thws[{i}]` = {(t, h, w)}: h and w must be divisible by hidden_stride={stride} "
                "(tokens are ordered in hidden_stride × hidden_stride blocks)."
            )


# Normalised pixels (mean/std normalisation of [0, 1] values) lie within a few units; a pixel value beyond this is not
# an image and overflows the patch embedding (fp16: at 1e5 already) into NaN features.
MAX_ABS_PIXEL_VALUE = 1e3


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
    if pixel_values.device.type == "meta":
        raise ValueError("`pixel_values` is on the meta device (shapes only, no data): pass real values.")
    if not torch.compiler.is_compiling():
        extremes = torch.stack(torch.aminmax(pixel_values.detach())).tolist()  # the one host sync for the values
        if not all(math.isfinite(value) for value in extremes):  # min and max propagate NaN
            raise ValueError("`pixel_values` contains NaN or infinite values.")
        largest = max(abs(value) for value in extremes)
        if largest > MAX_ABS_PIXEL_VALUE:
            raise ValueError(
                f"`pixel_values` holds a value of magnitude {largest:.3g}; normalised pixels lie within a few units "
                f"(at most {MAX_ABS_PIXEL_VALUE:g} accepted), and such values overflow the model into NaN. Pass the "
                "image processor's output."
            )
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


