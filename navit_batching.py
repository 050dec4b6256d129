# Copyright 2025 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""NaViT batching utilities around the packed processor output.

* :func:`pack_by_token_budget`: first-fit-decreasing packing of images into token-bounded batches;
* :func:`collate_packed`: concatenate processed samples into one packed batch;
* :func:`sample_max_pixels`: seeded per-image resolution sampling (NaViT-style training);
* :func:`naflex_to_packed`: SigLIP2 naflex processor output -> packed inputs.

The processor exposes each of them as a static method too (`processor.pack_by_token_budget(...)`), so that a processor
loaded with `trust_remote_code=True` reaches them without installing this package.
"""

import math
import random
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from transformers.image_processing_utils import BatchFeature

from .navit_image_utils import _as_int, _is_array, _positive_int, _to_numpy, block_order_raster_index, torch


# ----------------------------------------------------------------------------------------------------------------------
# NaViT training / batching helpers
# ----------------------------------------------------------------------------------------------------------------------


class _FirstFit:
    """First-fit bin assignment in O(log n) per item: a max-segment tree over the remaining capacity of the bins."""

    def __init__(self, capacity: int, max_bins: int) -> None:
        self.capacity = capacity
        self.size = 1
        while self.size < max(1, max_bins):
            self.size *= 2
        self.tree = [-1] * (2 * self.size)  # remaining capacity; -1 = bin not opened yet
        self.num_bins = 0

    def _set(self, index: int, value: int) -> None:
        i = index + self.size
        self.tree[i] = value
        i //= 2
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i //= 2

    def add(self, amount: int) -> int:
        """Put `amount` in the first open bin with room (or a new bin); return the bin index."""
        if amount <= self.capacity and self.tree[1] >= amount:
            i = 1
            while i < self.size:
                i = 2 * i if self.tree[2 * i] >= amount else 2 * i + 1
            index = i - self.size
            self._set(index, self.tree[i] - amount)
            return index
        index = self.num_bins
        self.num_bins += 1
        # An item larger than the budget gets a bin that nothing else can join (remaining capacity -1).
        self._set(index, self.capacity - amount if amount <= self.capacity else -1)
        return index


def _first_fit(order: Sequence[int], counts: Sequence[int], max_tokens: int) -> List[List[int]]:
    packer = _FirstFit(max_tokens, len(order))
    groups: List[List[int]] = []
    for index in order:
        b = packer.add(counts[index])
        if b == len(groups):
            groups.append([])
        groups[b].append(index)
    return groups


def pack_by_token_budget(token_counts: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Pack items (images) into groups (batches) whose token totals stay within `max_tokens`.

    First-fit decreasing: items are taken by decreasing count (ties by index) and each goes into the first group
    with room. The result also never has more groups than plain first-fit in the given order (both are computed;
    the one with fewer groups wins, first-fit decreasing on a tie).

    Guarantees: every index appears exactly once; indices are increasing within a group; groups are ordered by
    their first index; each group's total is `<= max_tokens`, except that an item larger than `max_tokens` is
    alone in its own group.

    Args:
        token_counts (`Sequence[int]`): non-negative cost of each item, e.g. `num_patches` from
            [`Siglip2NavitImageProcessor.get_num_tokens`] (the ViT sequence length).
        max_tokens (`int`): budget per group.

    Returns:
        `List[List[int]]`: groups of item indices. An empty input gives `[]`.
    """
    max_tokens = _positive_int(max_tokens, "max_tokens")
    if _is_array(token_counts):
        token_counts = _to_numpy(token_counts)
        if token_counts.ndim != 1:
            raise ValueError(f"`token_counts` must be 1-D, got shape {tuple(token_counts.shape)}.")
        token_counts = token_counts.tolist()
    if isinstance(token_counts, (str, bytes)) or not hasattr(token_counts, "__len__"):
        raise ValueError(f"`token_counts` must be a sequence of integers, got {type(token_counts).__name__}.")
    counts = []
    for i, c in enumerate(token_counts):
        c = _as_int(c, f"token_counts[{i}]")
        if c < 0:
            raise ValueError(f"`token_counts[{i}]` must be non-negative, got {c}.")
        counts.append(c)
    if not counts:
        return []
    decreasing = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    ffd = _first_fit(decreasing, counts, max_tokens)
    ff = _first_fit(range(len(counts)), counts, max_tokens)
    best = ff if len(ff) < len(ffd) else ffd
    best = [sorted(group) for group in best]
    best.sort(key=lambda group: group[0])
    return best


def collate_packed(samples: Sequence[Any], return_tensors: str = "pt") -> BatchFeature:
    """Concatenate processed samples into one packed batch (a `collate_fn` for `torch.utils.data.DataLoader`).

    Each sample is a mapping (e.g. the `BatchFeature` returned by the processor) with `pixel_values` `[N_i, D]`,
    `grid_thws` `[n_i, 3]` and, optionally, `keep_indices` (1-D, strictly increasing positions into its `N_i` rows,
    e.g. from `Siglip2NavitModel.sample_keep_indices`). The result holds the concatenated `pixel_values` and
    `grid_thws`, and, when any sample has `keep_indices`, their concatenation offset by each sample's row start
    (samples without `keep_indices` keep all their rows).

    Args:
        samples: the processed samples.
        return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"` or `"np"`.

    Returns:
        [`BatchFeature`] with `pixel_values` (float32), `grid_thws` (int64) and possibly `keep_indices` (int64).
    """
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"`return_tensors` must be 'pt' or 'np', got {return_tensors!r}.")
    if isinstance(samples, dict) or not isinstance(samples, (list, tuple)) or len(samples) == 0:
        raise ValueError("`samples` must be a non-empty list of processed samples (dicts with pixel_values, grid_thws).")
    pixel_values, grids, keeps = [], [], []
    any_keep = False
    offset = 0
    width = None
    for i, sample in enumerate(samples):
        if not hasattr(sample, "keys") or "pixel_values" not in sample or "grid_thws" not in sample:
            raise ValueError(f"Sample {i} must be a mapping with 'pixel_values' and 'grid_thws'.")
        pv, grid = _to_numpy(sample["pixel_values"]), _to_numpy(sample["grid_thws"])
        if pv.dtype.kind != "f":
            raise ValueError(f"Sample {i}: `pixel_values` must be floating point, got dtype {pv.dtype}.")
        if grid.dtype.kind not in "iu" or (grid.size and grid.min() <= 0):
            raise ValueError(f"Sample {i}: `grid_thws` must hold positive integers (t, h, w), got {grid.tolist()}.")
        pv, grid = pv.astype(np.float32, copy=False), grid.astype(np.int64, copy=False)
        if pv.ndim != 2:
            raise ValueError(f"Sample {i}: `pixel_values` must be 2-D [N, D], got shape {tuple(pv.shape)}.")
        if grid.ndim != 2 or grid.shape[1] != 3:
            raise ValueError(f"Sample {i}: `grid_thws` must have shape [n, 3], got {tuple(grid.shape)}.")
        if width is None:
            width = pv.shape[1]
        elif pv.shape[1] != width:
            raise ValueError(f"Sample {i} has rows of width {pv.shape[1]}, sample 0 has {width}; they cannot be packed.")
        num_rows = int(np.prod(grid, axis=1).sum())
        if num_rows != pv.shape[0]:
            raise ValueError(
                f"Sample {i}: `grid_thws` describes {num_rows} patches but `pixel_values` has {pv.shape[0]} rows."
            )
        keep = sample.get("keep_indices") if hasattr(sample, "get") else None
        if keep is not None:
            any_keep = True
            keep = _to_numpy(keep)
            if keep.ndim != 1 or keep.dtype.kind not in "iu":
                raise ValueError(
                    f"Sample {i}: `keep_indices` must be a 1-D integer array of row positions, got dtype {keep.dtype} "
                    f"and shape {tuple(keep.shape)}."
                )
            keep = keep.astype(np.int64, copy=False)
            if keep.size and (keep.min() < 0 or keep.max() >= pv.shape[0] or np.any(np.diff(keep) <= 0)):
                raise ValueError(
                    f"Sample {i}: `keep_indices` must be strictly increasing positions in [0, {pv.shape[0]})."
                )
        else:
            keep = np.arange(pv.shape[0], dtype=np.int64)
        pixel_values.append(pv)
        grids.append(grid)
        keeps.append(keep + offset)
        offset += pv.shape[0]
    data = {"pixel_values": np.concatenate(pixel_values, axis=0), "grid_thws": np.concatenate(grids, axis=0)}
    if any_keep:
        data["keep_indices"] = np.concatenate(keeps, axis=0)
    return BatchFeature(data=data, tensor_type=return_tensors)


def sample_max_pixels(
    rng: Union[None, int, np.random.Generator, random.Random],
    low: int,
    high: int,
    num_samples: Optional[int] = None,
    distribution: str = "log_uniform",
    factor: int = 32,
) -> Union[int, List[int]]:
    """Draw per-image `max_pixels` budgets for NaViT variable-resolution training.

    Each budget is drawn from `[low, high]` and rounded down to whole `factor x factor` tiles (never below `low`
    rounded up to a tile, never above `high`):

    * `"log_uniform"`: the area is log-uniform, so every scale (factor-of-2 step) is equally likely;
    * `"uniform_side"`: the side `sqrt(area)` is uniform in `[sqrt(low), sqrt(high)]`.

    Use it as `proc(images=img, max_pixels=sample_max_pixels(rng, 256**2, 1024**2), min_pixels=32 * 32)`: pass a
    `min_pixels` no larger than `low`, or the processor rejects budgets below its default `min_pixels`.

    Args:
        rng: a seed (`int`), a `numpy.random.Generator`, a `random.Random`, or `None` (fresh entropy).
        low (`int`), high (`int`): budget range in pixels; `factor**2 <= low <= high`.
        num_samples (`int`, *optional*): how many budgets to draw; `None` returns one `int`.
        distribution (`str`, *optional*, defaults to `"log_uniform"`): `"log_uniform"` or `"uniform_side"`.
        factor (`int`, *optional*, defaults to 32): `patch_size * hidden_stride`.

    Returns:
        `int` or `List[int]`: the budget(s).
    """
    factor = _positive_int(factor, "factor")
    low = _positive_int(low, "low")
    high = _positive_int(high, "high")
    if low > high:
        raise ValueError(f"`low` ({low}) must not be larger than `high` ({high}).")
    tile = factor * factor
    if high < tile:
        raise ValueError(f"`high` ({high}) must be at least one {factor}x{factor} tile ({tile} pixels).")
    if distribution not in ("log_uniform", "uniform_side"):
        raise ValueError(f"`distribution` must be 'log_uniform' or 'uniform_side', got {distribution!r}.")
    count = 1 if num_samples is None else _positive_int(num_samples, "num_samples")
    if isinstance(rng, random.Random):
        uniforms = [rng.random() for _ in range(count)]
    elif isinstance(rng, np.random.Generator):
        uniforms = rng.random(count).tolist()
    elif rng is None or isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        uniforms = np.random.default_rng(rng).random(count).tolist()
    else:
        raise ValueError(f"`rng` must be None, an int seed, a numpy Generator or a random.Random, got {type(rng).__name__}.")
    lowest, highest = -(-low // tile) * tile, (high // tile) * tile  # whole tiles inside [low, high]
    if lowest > highest:
        raise ValueError(
            f"No whole {factor}x{factor} tile count lies in [low, high] = [{low}, {high}]: budgets are multiples of "
            f"{tile} pixels; widen the range."
        )
    budgets = []
    for u in uniforms:
        if distribution == "log_uniform":
            area = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        else:
            side = math.sqrt(low) + u * (math.sqrt(high) - math.sqrt(low))
            area = side * side
        budget = int(area // tile) * tile
        budgets.append(int(min(max(budget, lowest), highest)))
    return budgets[0] if num_samples is None else budgets



# ----------------------------------------------------------------------------------------------------------------------
# interoperability: SigLIP2 naflex processor output -> packed inputs
# ----------------------------------------------------------------------------------------------------------------------


def naflex_to_packed(
    pixel_values, pixel_attention_mask, spatial_shapes, hidden_stride: int = 1, num_channels: int = 3
) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Turn SigLIP2 naflex processor output into this model's packed `(pixel_values, grid_thws)`.

    Args:
        pixel_values: `[B, L, p·p·C]` padded patches, each flattened (row-in-patch, col-in-patch, channel), as
            returned by transformers' `Siglip2ImageProcessor` (torch tensor or numpy array).
        pixel_attention_mask: `[B, L]`, 1 for the real patches (the first `h·w` of each row), 0 for padding.
        spatial_shapes: `[B, 2]` patch grid `(h, w)` of each image.
        hidden_stride: the converted model's `config.hidden_stride`; with 2 the patches are put in 2x2-block order,
            which needs even `h` and `w`.
        num_channels: `C` (3 for RGB).

    Returns:
        `pixel_values` float `[Σ h·w, C·p·p]` with rows flattened (channel, row-in-patch, col-in-patch) and in
        hidden_stride-block order, and `grid_thws` int64 `[B, 3]` = `(1, h, w)`.
    """
    pixel_values = torch.as_tensor(pixel_values)
    mask = torch.as_tensor(pixel_attention_mask).bool()
    shapes = torch.as_tensor(spatial_shapes).long().reshape(-1, 2)
    if pixel_values.ndim != 3 or mask.shape != pixel_values.shape[:2] or shapes.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"Expected pixel_values [B, L, p·p·C], pixel_attention_mask [B, L] and spatial_shapes [B, 2]; got "
            f"{tuple(pixel_values.shape)}, {tuple(mask.shape)} and {tuple(torch.as_tensor(spatial_shapes).shape)}."
        )
    dim = pixel_values.shape[-1]
    patch_size = math.isqrt(dim // num_channels)
    if patch_size * patch_size * num_channels != dim:
        raise ValueError(f"Patch rows of length {dim} are not p·p·{num_channels} for any integer patch size p.")
    s = int(hidden_stride)
    rows, grids = [], []
    for i, (h, w) in enumerate(shapes.tolist()):
        n = h * w
        if n <= 0 or n > pixel_values.shape[1]:
            raise ValueError(f"spatial_shapes[{i}] = {(h, w)} does not fit in {pixel_values.shape[1]} patches.")
        if int(mask[i].sum()) != n or not bool(mask[i, :n].all()):
            raise ValueError(
                f"Image {i}: pixel_attention_mask must mark exactly its first h·w = {n} patches as real "
                f"(got {int(mask[i].sum())} real patches)."
            )
        if h % s or w % s:
            raise ValueError(
                f"Image {i} has a {h}x{w} patch grid, not divisible by hidden_stride={s}: use a hidden_stride=1 "
                f"model, or preprocess with this repo's Siglip2NavitImageProcessor."
            )
        # naflex rows are raster-ordered patches flattened as (row-in-patch, col-in-patch, channel); packed rows are
        # in s x s block order, flattened as (channel, row-in-patch, col-in-patch)
        raster = pixel_values[i, :n].reshape(n, patch_size, patch_size, num_channels).permute(0, 3, 1, 2)
        patches = raster.reshape(n, dim)[torch.from_numpy(block_order_raster_index(h, w, s))]
        rows.append(patches)
        grids.append((1, h, w))
    return torch.cat(rows, dim=0), torch.tensor(grids, dtype=torch.long)

