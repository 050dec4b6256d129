#!/usr/bin/env python
# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Side-by-side benchmark of the packed SigLIP2 NaViT encoder (issue #6).

Every contender runs the *same weights* on the *same images* in one process:

    packed-sdpa / packed-eager   this model, all images packed into one sequence, per attention backend (on CUDA
                                  in half precision, packed-sdpa is torch's varlen kernel)
    packed-flash                  (CUDA, when flash-attn is installed) flash-attn varlen
    packed-sdpa-sync-per-layer    (CUDA only) the reference design: one host sync per encoder layer
    per-image-sdpa                this model called once per image (no packing)
    naflex-padded                 transformers' Siglip2VisionModel on the padded batch (max_num_patches = largest
                                  image, pixel_attention_mask), weights copied through the naflex conversion mapping
    packed-sdpa-ovis              this model in its shipped Ovis2.5 configuration (2D RoPE, bicubic 32×32 PE): the
                                  RoPE/PE cost on top of the naflex-equivalent configuration (its PE table differs)

The timed configuration of this model is the naflex-equivalent one (use_rope=False, bilinear+antialias PE on a
16×16 grid, no head), so its output equals the naflex model's output; the benchmark checks that and reports the
max-abs difference. hidden_stride stays 2 (images sized by the real image processor with factor 32), only the token
order differs, which the comparison undoes.

Timing is interleaved: per workload, the two matmul floors are timed first (warm-up, then `--repeats` rounds of one
call each), their buffers are freed, then every contender is warmed up and `--repeats` rounds run each contender once
in turn, so a drift in machine load affects all contenders alike (packed vs per-image is also reported as a
per-round paired ratio).

Reported per contender and workload: median wall time over `--repeats` runs after `--warmup` runs, tokens/s (real
tokens, no padding), speed ratio vs naflex-padded from the same run, efficiency = matmul floor / time, achieved
FLOP/s and its fraction of the device's measured matmul peak, and peak memory of the first call (CPU: peak live
tensor bytes, see `LiveTensorBytes`; CUDA: torch.cuda.max_memory_allocated). Timed calls run under the process's own
allocator settings (the benchmark sets none). Also: token dropping (keep 50%) and
torch.compile. Writes `<out>/benchmark.json`, `<out>/benchmark.md`, and `<out>/benchmark.png` when matplotlib is
installed (`pip install 'siglip2-navit[bench]'`).

    python scripts/benchmark.py --quick                  # small config, few images, < 1 min on 2 CPU cores
    python scripts/benchmark.py --layers 1               # so400m widths, 1 of 27 layers (CPU-friendly)
    python scripts/benchmark.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


REPO_ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkpoint_utils  # noqa: E402


_checkpoint_utils.import_package()  # the installed package, or this checkout's root registered as `siglip2_navit`
from siglip2_navit.configuration_siglip2_navit import Siglip2NavitConfig  # noqa: E402
from siglip2_navit.image_processing_siglip2_navit import Siglip2NavitImageProcessor  # noqa: E402
from siglip2_navit.modeling_siglip2_navit import Siglip2NavitModel  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------------
# Configurations and workloads
# ----------------------------------------------------------------------------------------------------------------------

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
SMALL = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3)
NAFLEX_GRID = 16  # naflex checkpoints learn a 16×16 PE grid


def navit_config(size: dict, naflex_equivalent: bool, layers: Optional[int]) -> Siglip2NavitConfig:
    """This model's config: naflex-equivalent math (the timed one) or the shipped Ovis2.5 settings."""
    kwargs = dict(size)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    if naflex_equivalent:
        kwargs.update(use_rope=False, pe_interpolation="bilinear", pe_antialias=True, image_size=NAFLEX_GRID * 16)
    return Siglip2NavitConfig(patch_size=16, hidden_stride=2, vision_use_head=False, **kwargs)


@dataclass
class Workload:
    name: str
    sizes: list[tuple[int, int]]  # original (height, width) of each image, before the processor resizes it
    min_pixels: int = 448 * 448
    max_pixels: int = 1792 * 1792


def mixed_sizes(n: int, smallest: int, largest: int, seed: int = 0) -> list[tuple[int, int]]:
    """n sizes with areas geometric from smallest² to largest² and aspect ratios geometric from 1:4 to 4:1."""
    areas = np.geomspace(smallest**2, largest**2, n)
    aspects = np.random.default_rng(seed).permutation(np.geomspace(1 / 4, 4, n))  # width / height
    return [(round(math.sqrt(a / r)), round(math.sqrt(a * r))) for a, r in zip(areas, aspects)]


def workloads(quick: bool) -> list[Workload]:
    if quick:
        budget = dict(min_pixels=128 * 128, max_pixels=768 * 768)
        return [
            Workload("mixed", mixed_sizes(6, 128, 384), **budget),
            *[Workload(f"scaling-{n}", [(256, 256)] * n, **budget) for n in (1, 4, 16)],
            Workload("single-768", [(768, 768)], **budget),
        ]
    return [
        Workload("mixed", mixed_sizes(16, 224, 1024)),
        Workload("uniform", [(448, 448)] * 16),
        *[Workload(f"scaling-{n}", [(448, 448)] * n) for n in (1, 4, 16, 64)],
        Workload("single-1792", [(1792, 1792)]),
    ]


def make_inputs(workload: Workload, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random RGB images of the workload's sizes through the real image processor (fixed seed)."""
    rng = np.random.default_rng(seed)
    processor = Siglip2NavitImageProcessor(min_pixels=workload.min_pixels, max_pixels=workload.max_pixels)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in workload.sizes]
    batch = processor(images=images, return_tensors="pt")
    return batch["pixel_values"], batch["grid_thws"]


# ----------------------------------------------------------------------------------------------------------------------
# transformers' naflex model on the padded batch, same weights
# ----------------------------------------------------------------------------------------------------------------------


def _naflex_converter():
    """scripts/convert_siglip2_naflex.py (the real conversion mapping), or None when it cannot be imported."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import convert_siglip2_naflex
    except ImportError:
        return None
    finally:
        sys.path.pop(0)
    return convert_siglip2_naflex


def naflex_to_navit_state_dict(state_dict: dict, num_channels: int, patch_size: int) -> dict:
    """SPEC §7: prefix `vision_model.`, Linear patch embedding [hidden, p·p·C] -> Conv2d layout [hidden, C, p, p]."""
    converter = _naflex_converter()
    converted = {}
    for name, value in state_dict.items():
        name = name if name.startswith("vision_model.") else "vision_model." + name
        if name == "vision_model.embeddings.patch_embedding.weight":
            if converter is not None:
                value = converter.patch_embedding_to_conv(value, num_channels, patch_size)
            else:
                value = value.reshape(value.shape[0], patch_size, patch_size, num_channels).permute(0, 3, 1, 2)
        converted[name] = value.contiguous()
    return converted


def build_models(size: dict, layers: Optional[int], seed: int, with_ovis: bool):
    """transformers' naflex Siglip2VisionModel with random weights, and this model with those weights copied through
    the naflex conversion mapping (scripts/convert_siglip2_naflex.py when importable; config from its
    `navit_config_kwargs`, hidden_stride 2). Optionally the same weights in the shipped Ovis2.5 configuration (its own
    32×32 PE table)."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    naflex_config = Siglip2VisionConfig(
        hidden_size=size["hidden_size"],
        intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_hidden_layers"] if layers is None else layers,
        num_attention_heads=size["num_attention_heads"],
        num_patches=NAFLEX_GRID * NAFLEX_GRID,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    naflex = Siglip2VisionModel(naflex_config).eval()
    converter = _naflex_converter()
    if converter is not None:
        kwargs = converter.navit_config_kwargs(converter.vision_config_of(naflex_config.to_dict()), hidden_stride=2)
        config = Siglip2NavitConfig(**kwargs)
    else:
        config = navit_config(size, naflex_equivalent=True, layers=layers)
    model = Siglip2NavitModel(config)
    state_dict = naflex_to_navit_state_dict(naflex.state_dict(), config.num_channels, config.patch_size)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    ovis = None
    if with_ovis:
        ovis = Siglip2NavitModel(navit_config(size, naflex_equivalent=False, layers=layers))
        ovis.load_state_dict({k: v for k, v in state_dict.items() if "position_embedding" not in k}, strict=False)
        ovis.eval()
    return model, naflex, ovis


def raster_index(grids: list[tuple[int, int, int]], stride: int) -> list[torch.Tensor]:
    """Per image: the packed rows (hidden_stride-block order, SPEC §3) of its patches in raster order."""
    indices, offset = [], 0
    for t, h, w in grids:
        assert t == 1, "the naflex baseline handles single-frame images only"
        r = torch.arange(h)[:, None]
        c = torch.arange(w)[None, :]
        block = (r // stride) * (w // stride) + c // stride
        indices.append((offset + (block * stride + r % stride) * stride + c % stride).flatten())
        offset += h * w
    return indices


def naflex_inputs(pixel_values: torch.Tensor, grids: list, num_channels: int, patch_size: int, stride: int):
    """The padded naflex batch: [B, max_patches, p·p·C] patches in raster order, the mask and spatial shapes."""
    indices = raster_index(grids, stride)
    max_patches = max(len(i) for i in indices)
    width = num_channels * patch_size * patch_size
    padded = pixel_values.new_zeros(len(indices), max_patches, width)
    mask = torch.zeros(len(indices), max_patches, dtype=torch.long)
    for b, index in enumerate(indices):
        rows = pixel_values[index].view(-1, num_channels, patch_size, patch_size).permute(0, 2, 3, 1)
        padded[b, : len(index)] = rows.reshape(len(index), width)
        mask[b, : len(index)] = 1
    spatial_shapes = torch.tensor([[h, w] for _, h, w in grids], dtype=torch.long)
    return padded, mask, spatial_shapes, indices


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage created during a call: every op's output storage counts from the op that
    creates it until it is freed. The CPU counterpart of `torch.cuda.max_memory_allocated`: independent of the
    allocator (whether glibc keeps freed memory mapped or not), of other contenders and of the process's baseline.
    Scratch buffers that a kernel allocates and frees internally are not seen (as on CUDA they would be)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self.live -= size
        self._storages.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._storages:  # a view, or an in-place result
                continue
            self._storages.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, size)
        return out


class PeakMemory:
    """Peak memory of one call, in bytes above what was allocated before it: CUDA `torch.cuda.max_memory_allocated`,
    CPU `LiveTensorBytes` (the call runs under a dispatch mode, so it is never one of the timed calls)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            self.mode = LiveTensorBytes().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.mode.__exit__(*exc)
            self.peak = self.mode.peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]  # set by --timer


def _error_text(err: Exception, limit: int = 300) -> str:
    """A failure as reported in the benchmark's results: exception type and message, cut to `limit` characters."""
    return f"{type(err).__name__}: {err}"[:limit]


def time_interleaved(
    fns: dict, device: torch.device, warmup: int, repeats: int, measure_memory: bool = True, keep_going: bool = False
) -> dict:
    """Time several callables side by side: each first runs once to measure its peak memory (unless not
    `measure_memory`) and `warmup` more times untimed, then `repeats` rounds run every callable once, in turn. A slow
    drift of the machine's load (other processes, thermal state) hits every contender alike instead of whichever ran
    last, and each round gives paired ratios. Per name: the median, the individual times (round order) and the peak
    memory of the first call.

    The clock is wall time, or with `--timer cpu` this process's CPU time (robust on a busy machine when run with
    `--threads 1`: time spent descheduled is not counted).

    With `keep_going`, a callable that raises in its first calls (out of memory, a broken optional kernel) is reported
    as `{"error": ...}` and left out of the rounds, so one failing contender does not cost the whole run."""
    results, failed = {}, {}
    for name, fn in fns.items():
        memory = PeakMemory(device)
        try:
            if measure_memory:
                with memory:
                    out = fn()
                    del out
            for _ in range(warmup):
                fn()
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            if not keep_going:
                raise
            failed[name] = {"error": _error_text(err)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results[name] = {"times_s": [], "peak_memory_bytes": memory.peak}
    fns = {name: fn for name, fn in fns.items() if name not in failed}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = CLOCK()
            out = fn()
            _sync(device)
            results[name]["times_s"].append(CLOCK() - start)
            del out
    for result in results.values():
        result["median_s"] = statistics.median(result["times_s"])
    return {**results, **failed}


def time_call(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, measure_memory: bool = True
) -> dict:
    """`time_interleaved` of one callable."""
    return time_interleaved({"fn": fn}, device, warmup, repeats, measure_memory)["fn"]


def paired_ratio(numerator: dict, denominator: dict) -> dict:
    """Per-round ratios of two contenders timed by `time_interleaved` in the same rounds: median, min, max."""
    ratios = [a / b for a, b in zip(numerator["times_s"], denominator["times_s"])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def model_flops(grids: list, config: Siglip2NavitConfig, num_tokens: Optional[int] = None) -> float:
    """Matmul FLOPs of one forward (docs/benchmarks.md derives it): patch embedding + per layer the projections,
    MLP and attention (QKᵀ and PV) per sequence. Elementwise ops are not counted."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    seq_lens = [h * w for t, h, w in grids for _ in range(t)]
    tokens = sum(seq_lens) if num_tokens is None else num_tokens
    patch = config.num_channels * config.temporal_patch_size * config.patch_size**2
    dense = tokens * (2 * patch * hidden + layers * (8 * hidden * hidden + 4 * hidden * inter))
    attention = layers * sum(4 * n * n * hidden for n in seq_lens)
    return float(dense + attention)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput (FLOP/s): 8192³ on CUDA, 2048³ on CPU (median of 5)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    result = time_call(lambda: torch.mm(a, b, out=out), device, warmup=2, repeats=5)
    return 2 * n**3 / result["median_s"]


def matmul_floor(seq_lens: list[int], config: Siglip2NavitConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Callables that run exactly the unavoidable matmuls of one forward, bare, into preallocated outputs.

    Per layer, on the K packed tokens: QKV (one fused [K, H] × [H, 3H]), out-proj, fc1, fc2 (no bias); and per group
    of equal-length sequences QKᵀ and PV as batched matmuls (split into chunks of ≤ 256 MiB of scores so that long
    sequences fit in memory). Nothing else: no bias, norm, activation, softmax, RoPE, PE, reordering.

    "floor-sdpa" runs the same dense matmuls with the attention done by one bare `scaled_dot_product_attention`
    call per group instead. On CPU, torch's fused flash kernel can beat the bare QKᵀ/PV matmuls (it never
    writes the [L, L] scores to memory), so a model can run above 100 % of the bmm floor; the sdpa floor is then the
    stricter reference.
    """
    hidden, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    head_dim = hidden // heads
    tokens = sum(seq_lens)
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype) * 0.02  # noqa: E731
    x, w_qkv, w_o, w_1, w_2 = (
        make(tokens, hidden), make(hidden, 3 * hidden), make(hidden, hidden), make(hidden, inter), make(inter, hidden)
    )
    qkv_out, o_out, h_out = make(tokens, 3 * hidden), make(tokens, hidden), make(tokens, inter)

    groups: dict[int, int] = {}
    for n in seq_lens:
        groups[n] = groups.get(n, 0) + 1
    element_bytes = torch.finfo(dtype).bits // 8
    bmm_jobs = []  # (q, kᵀ, v, scores, out) per chunk of (sequences × heads); chunks of one shape share buffers
    buffers: dict = {}
    for length, count in groups.items():
        chunk = max(1, min(count * heads, (256 << 20) // (length * length * element_bytes)))
        remaining = count * heads
        while remaining > 0:
            b = min(chunk, remaining)
            if (b, length) not in buffers:
                buffers[(b, length)] = (
                    make(b, length, head_dim), make(b, head_dim, length), make(b, length, head_dim),
                    make(b, length, length), make(b, length, head_dim),
                )
            bmm_jobs.append(buffers[(b, length)])
            remaining -= b
    sdpa_jobs = [tuple(make(count, heads, length, head_dim) for _ in range(3)) for length, count in groups.items()]

    def dense():
        torch.mm(x, w_qkv, out=qkv_out)
        torch.mm(x, w_o, out=o_out)
        torch.mm(x, w_1, out=h_out)
        torch.mm(h_out, w_2, out=o_out)

    def bmm_forward():
        for _ in range(config.num_hidden_layers):
            dense()
            for q, kt, v, scores, out in bmm_jobs:
                torch.bmm(q, kt, out=scores)
                torch.bmm(scores, v, out=out)

    def sdpa_forward():
        for _ in range(config.num_hidden_layers):
            dense()
            for q, k, v in sdpa_jobs:
                F.scaled_dot_product_attention(q, k, v)

    return {"floor-bmm": bmm_forward, "floor-sdpa": sdpa_forward}


# ----------------------------------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    run: Callable[[], object]
    note: str = ""
    padded_tokens: Optional[int] = None


def _with_backend(model: Siglip2NavitModel, name: str) -> Siglip2NavitModel:
    model.config._attn_implementation = name
    return model


def sync_per_layer_hooks(model: Siglip2NavitModel) -> list:
    """The reference design: each layer reads its sequence lengths back to the host (`.tolist()`), one sync/layer."""

    def hook(module, args):
        args[2].cu_seqlens.diff().max().item()

    return [layer.register_forward_pre_hook(hook) for layer in model.vision_model.encoder.layers]


CONTENDER_NAMES = (
    "packed-sdpa",
    "packed-eager",
    "packed-flash",
    "packed-sdpa-sync-per-layer",
    "per-image-sdpa",
    "naflex-padded",
    "packed-sdpa-ovis",
)


def contenders_for(
    model: Siglip2NavitModel,
    ovis_model: Optional[Siglip2NavitModel],
    naflex: Optional[torch.nn.Module],
    pixel_values: torch.Tensor,
    grid_thws: torch.Tensor,
    all_contenders: bool,
) -> list[Contender]:
    device = model.device
    grids = [tuple(g) for g in grid_thws.tolist()]
    cfg = model.config
    counts = [t * h * w for t, h, w in grids]
    starts = np.cumsum([0] + counts).tolist()

    def packed(backend: str, m: Siglip2NavitModel = model) -> Callable[[], object]:
        def run():
            m.config._attn_implementation = backend
            return m(pixel_values, grid_thws).last_hidden_state

        return run

    result = [
        Contender("packed-sdpa", packed("sdpa")),
        Contender("packed-eager", packed("eager")),
    ]
    if device.type == "cuda" or all_contenders:
        if importlib.util.find_spec("flash_attn") is not None:
            result.append(Contender("packed-flash", packed("flash_attention_2"), "flash-attn varlen"))
        hooks_run = packed("sdpa")

        def sync_per_layer():
            hooks = sync_per_layer_hooks(model)
            try:
                return hooks_run()
            finally:
                for h in hooks:
                    h.remove()

        result.append(Contender("packed-sdpa-sync-per-layer", sync_per_layer, "reference design: 1 host sync/layer"))

    def per_image():
        model.config._attn_implementation = "sdpa"
        return [
            model(pixel_values[starts[i] : starts[i + 1]], grid_thws[i : i + 1]).last_hidden_state
            for i in range(len(grids))
        ]

    result.append(Contender("per-image-sdpa", per_image, "one forward per image"))
    if naflex is not None:
        padded, mask, shapes, _ = naflex_inputs(pixel_values, grids, cfg.num_channels, cfg.patch_size, cfg.hidden_stride)
        padded, mask = padded.to(device), mask.to(device)

        def naflex_run():
            return naflex(pixel_values=padded, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state

        result.append(
            Contender("naflex-padded", naflex_run, "transformers Siglip2VisionModel, sdpa + mask", padded.shape[0] * padded.shape[1])
        )
    if ovis_model is not None:
        result.append(Contender("packed-sdpa-ovis", packed("sdpa", ovis_model), "RoPE + bicubic 32×32 PE"))
    return result


def naflex_agreement(model, naflex, pixel_values, grid_thws) -> float:
    """max |ours - naflex| over all real tokens (ours in raster order)."""
    cfg = model.config
    grids = [tuple(g) for g in grid_thws.tolist()]
    padded, mask, shapes, indices = naflex_inputs(pixel_values, grids, cfg.num_channels, cfg.patch_size, cfg.hidden_stride)
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        ours = model(pixel_values, grid_thws).last_hidden_state.float().cpu()
        theirs = naflex(pixel_values=padded.to(model.device), pixel_attention_mask=mask.to(model.device),
                        spatial_shapes=shapes).last_hidden_state.float().cpu()
    return max(float((ours[index] - theirs[b, : len(index)]).abs().max()) for b, index in enumerate(indices))


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def machine_description(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if names:
            info["cpu"] = f"{names[0]} × {len(names)} logical CPUs"
    except OSError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt_bytes(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def render_markdown(report: dict) -> str:
    lines = [f"## {report['title']}", ""]
    m = report["machine"]
    lines.append(
        f"Machine: {m['cpu']}; {m.get('gpu', 'no GPU')}; torch {m['torch']}, transformers {m.get('transformers', '?')}, "
        f"{m['threads']} threads. dtype {report['dtype']}. Config: {report['config_description']}. "
        f"Median of {report['repeats']} after a memory-measuring call and {report['warmup']} warm-up "
        f"({report['timer']} time). Matmul peak measured: "
        f"{report['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s."
    )
    lines.append("")
    header = (
        "| workload | images | tokens | contender | time (s) | tokens/s | × vs naflex-padded | of floor (bmm / sdpa) | "
        "GFLOP/s | of matmul peak | peak memory |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for w in report["workloads"]:
        floor = w["matmul_floor_s"]
        lines.append(
            f"| {w['name']} | {w['images']} | {w['tokens']} | *matmul floor* | {floor:.3f} | "
            f"{w['tokens'] / floor:,.0f} | | 100 % / {100 * w['sdpa_floor_s'] / floor:.0f} % | "
            f"{w['flops'] / floor / 1e9:,.0f} | | |"
        )
        for c in w["contenders"]:
            if "error" in c:
                lines.append(f"| {w['name']} | | | {c['name']} | {c['error']} | | | | | | |")
                continue
            ratio = c.get("speedup_vs_naflex_padded")
            lines.append(
                f"| {w['name']} | | | {c['name']} | {c['median_s']:.3f} | {c['tokens_per_s']:,.0f} | "
                f"{'' if ratio is None else f'{ratio:.2f}×'} | {100 * c['efficiency_vs_floor']:.0f} % / "
                f"{100 * c['efficiency_vs_sdpa_floor']:.0f} % | "
                f"{c['achieved_flops'] / 1e9:,.0f} | {100 * c['fraction_of_matmul_peak']:.0f} % | "
                f"{_fmt_bytes(c['peak_memory_bytes'])} |"
            )
        if w.get("naflex_max_abs_diff") is not None:
            lines.append(f"| {w['name']} | | | *max abs diff ours vs naflex* | {w['naflex_max_abs_diff']:.1e} | | | | | | |")
    paired = [(w["name"], w["packed_vs_per_image"]) for w in report["workloads"] if w.get("packed_vs_per_image")]
    if paired:
        lines += [
            "",
            "Packing vs the per-image loop (per-image time ÷ packed time, paired round by round; > 1 = packing wins): "
            + ", ".join(f"{name} **{r['median']:.2f}×** ({r['min']:.2f}–{r['max']:.2f})" for name, r in paired)
            + ".",
        ]
    if report.get("token_dropping"):
        d = report["token_dropping"]
        lines += [
            "",
            f"Token dropping ({d['workload']}, keep {d['keep_fraction']:.0%}: {d['kept_tokens']} of {d['tokens']} tokens): "
            f"{d['median_s']:.3f} s vs full {d['full_median_s']:.3f} s = **{100 * d['time_fraction']:.0f} %** of the full "
            f"forward (target ≤ 65 %).",
        ]
    if report.get("compile"):
        c = report["compile"]
        if "error" in c:
            lines += ["", f"torch.compile: failed: {c['error']}"]
        else:
            lines += [
                "",
                f"torch.compile(model, dynamic=True) ({c['workload']}, sdpa): first call (compile) {c['first_call_s']:.1f} s, "
                f"then {c['median_s']:.3f} s "
                + ("(eager packed-sdpa not timed), " if c["eager_median_s"] is None else
                   f"vs eager {c['eager_median_s']:.3f} s (**{c['speedup_vs_eager']:.2f}×**), ")
                + f"max abs diff vs eager {c['max_abs_diff']:.1e}. A batch of another composition ({c['new_composition']['images']} "
                f"of the images, {c['new_composition']['tokens']:,} tokens) right after: first call "
                f"{c['new_composition']['first_call_s']:.2f} s, **{c['new_composition']['new_graphs']} new graph(s)** compiled.",
            ]
    if report.get("memory_scaling"):
        s = report["memory_scaling"]
        lines += [
            "",
            "Memory scaling (packed-sdpa peak): " + ", ".join(f"{k}: {_fmt_bytes(v)}" for k, v in s["peaks"].items())
            + f"; largest / 4×(largest/4 images) = {s['ratio_vs_linear']:.2f} (≤ ~1 means linear).",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'siglip2-navit[bench]'): skipping the plot")
        return False
    series: dict[str, list[tuple[int, float]]] = {}
    for w in report["workloads"]:
        for c in w["contenders"]:
            if "error" not in c:
                series.setdefault(c["name"], []).append((w["tokens"], c["tokens_per_s"]))
        series.setdefault("matmul floor", []).append((w["tokens"], w["tokens"] / w["matmul_floor_s"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name,
                linestyle="--" if name == "matmul floor" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("total tokens in the batch")
    ax.set_ylabel("tokens / s")
    ax.set_title(report["title"])
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small config and few small images (< 1 min on 2 cores)")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (widths unchanged)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--timer", choices=sorted(CLOCKS), default="wall",
                        help="wall clock, or process CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5, 3 with --quick)")
    parser.add_argument("--workloads", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--contenders", default=None, help="comma-separated names to run (default: all available)")
    parser.add_argument("--all-contenders", action="store_true",
                        help="also run the CUDA-only contenders on CPU (exercises their code path)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="benchmark torch.compile (default: on, off with --quick)")
    parser.add_argument("--eager-max-seq", type=int, default=8192,
                        help="skip packed-eager when a sequence is longer (its [heads, L, L] maps)")
    parser.add_argument("--out", default=str(REPO_ROOT / "out" / "benchmark"))
    parser.add_argument("--title", default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    global CLOCK
    CLOCK = CLOCKS[args.timer]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    do_compile = (not args.quick) if args.compile is None else args.compile
    size = SMALL if args.quick else SO400M
    wanted = None if args.contenders is None else set(args.contenders.split(","))
    unknown = (wanted or set()) - set(CONTENDER_NAMES)
    if unknown:
        raise SystemExit(f"error: unknown --contenders {sorted(unknown)}; choose from {', '.join(CONTENDER_NAMES)}")
    selected = workloads(args.quick)
    if args.workloads:
        names = set(args.workloads.split(","))
        unknown = names - {w.name for w in selected}
        if unknown:
            raise SystemExit(
                f"error: unknown --workloads {sorted(unknown)}; choose from {', '.join(w.name for w in selected)}"
            )
        selected = [w for w in selected if w.name in names]

    model, naflex, ovis_model = build_models(size, args.layers, args.seed, wanted is None or "packed-sdpa-ovis" in wanted)
    model = model.to(device=device, dtype=dtype)
    naflex = naflex.to(device=device, dtype=dtype) if wanted is None or "naflex-padded" in wanted else None
    ovis_model = None if ovis_model is None else ovis_model.to(device=device, dtype=dtype)

    cfg = model.config
    description = (
        f"{'small' if args.quick else 'so400m'} widths (hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, "
        f"{cfg.num_attention_heads} heads, patch {cfg.patch_size}), {cfg.num_hidden_layers} layer(s), "
        f"naflex-equivalent (no RoPE, bilinear+antialias 16×16 PE), hidden_stride {cfg.hidden_stride}"
    )
    report = {
        "title": args.title or f"siglip2-navit benchmark ({'quick' if args.quick else 'so400m'}, {device.type})",
        "machine": machine_description(device),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "config_description": description,
        "config": {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")},
        "timer": args.timer,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "matmul_peak_flops": matmul_peak(device, dtype),
        "workloads": [],
    }

    inputs_by_name = {}
    with torch.inference_mode():
        for workload in selected:
            pixel_values, grid_thws = make_inputs(workload, args.seed)
            pixel_values = pixel_values.to(device=device, dtype=dtype)
            inputs_by_name[workload.name] = (pixel_values, grid_thws)
            grids = [tuple(g) for g in grid_thws.tolist()]
            seq_lens = [h * w for t, h, w in grids for _ in range(t)]
            tokens = sum(seq_lens)
            flops = model_flops(grids, cfg)
            print(f"[{workload.name}] {len(grids)} images, {tokens} tokens, longest {max(seq_lens)}", flush=True)
            # The floors run first, on their own: their scratch buffers (GBs) are freed before the contenders run,
            # since a large resident set measurably slows the contenders' fresh allocations (packed-sdpa by ~10 %).
            floor_runs = matmul_floor(seq_lens, cfg, device, dtype)
            floor_timed = time_interleaved(floor_runs, device, args.warmup, args.repeats)
            del floor_runs
            gc.collect()
            runs, contenders = {}, []
            for contender in contenders_for(model, ovis_model, naflex, pixel_values, grid_thws, args.all_contenders):
                if wanted is not None and contender.name not in wanted:
                    continue
                if contender.name == "packed-eager" and max(seq_lens) > args.eager_max_seq:
                    contenders.append((contender, f"skipped (sequence > {args.eager_max_seq})"))
                    continue
                contenders.append((contender, None))
                runs[contender.name] = contender.run
            timed = time_interleaved(runs, device, args.warmup, args.repeats, keep_going=True)
            floor = {"median_s": floor_timed["floor-bmm"]["median_s"], "times_s": floor_timed["floor-bmm"]["times_s"],
                     "sdpa_floor_s": floor_timed["floor-sdpa"]["median_s"]}
            entry = {
                "name": workload.name,
                "images": len(grids),
                "grids": grids,
                "tokens": tokens,
                "flops": flops,
                "matmul_floor_s": floor["median_s"],
                "matmul_floor_times_s": floor["times_s"],
                "sdpa_floor_s": floor["sdpa_floor_s"],
                "contenders": [],
            }
            if naflex is not None and "error" not in timed.get("naflex-padded", {"error": "not run"}):
                try:  # the padded batch once more, outside the timed rounds: may still fail (out of memory)
                    entry["naflex_max_abs_diff"] = naflex_agreement(model, naflex, pixel_values, grid_thws)
                except Exception as err:  # noqa: BLE001 - reported, not hidden
                    entry["naflex_agreement_error"] = _error_text(err)
            for contender, skipped in contenders:
                skipped = skipped or timed[contender.name].get("error")
                if skipped:
                    entry["contenders"].append({"name": contender.name, "error": skipped})
                    print(f"  {contender.name:28s} {skipped}", flush=True)
                    continue
                measured = timed[contender.name]
                measured.update(
                    name=contender.name,
                    note=contender.note,
                    tokens_per_s=tokens / measured["median_s"],
                    efficiency_vs_floor=floor["median_s"] / measured["median_s"],
                    efficiency_vs_sdpa_floor=floor["sdpa_floor_s"] / measured["median_s"],
                    achieved_flops=flops / measured["median_s"],
                    fraction_of_matmul_peak=flops / measured["median_s"] / report["matmul_peak_flops"],
                )
                if contender.padded_tokens is not None:
                    measured["padded_tokens"] = contender.padded_tokens
                entry["contenders"].append(measured)
                print(f"  {contender.name:28s} {measured['median_s']:8.3f} s  peak {_fmt_bytes(measured['peak_memory_bytes'])}", flush=True)
            if all("median_s" in timed.get(name, {}) for name in ("packed-sdpa", "per-image-sdpa")):
                entry["packed_vs_per_image"] = paired_ratio(timed["per-image-sdpa"], timed["packed-sdpa"])
            baseline = next((c for c in entry["contenders"] if c["name"] == "naflex-padded" and "error" not in c), None)
            for c in entry["contenders"]:
                if baseline is not None and "error" not in c:
                    c["speedup_vs_naflex_padded"] = baseline["median_s"] / c["median_s"]
            print(f"  {'matmul floor':28s} {floor['median_s']:8.3f} s", flush=True)
            report["workloads"].append(entry)
            gc.collect()

        scaling = {
            w["name"]: next((c.get("peak_memory_bytes") for c in w["contenders"] if c["name"] == "packed-sdpa"), None)
            for w in report["workloads"]
            if w["name"].startswith("scaling-")
        }
        if len(scaling) >= 2 and all(v for v in scaling.values()):
            names = sorted(scaling, key=lambda n: int(n.split("-")[1]))
            big, small = names[-1], names[-2]
            factor = int(big.split("-")[1]) / int(small.split("-")[1])
            report["memory_scaling"] = {"peaks": {n: scaling[n] for n in names},
                                        "ratio_vs_linear": scaling[big] / (factor * scaling[small])}

        drop_name = "mixed" if "mixed" in inputs_by_name else next(iter(inputs_by_name), None)
        full = next((w for w in report["workloads"] if w["name"] == drop_name), None)
        full_s = None if full is None else next(
            (c.get("median_s") for c in full["contenders"] if c["name"] == "packed-sdpa"), None
        )
        if full_s is not None:  # token dropping, against the full packed-sdpa forward of the same run
            pixel_values, grid_thws = inputs_by_name[drop_name]
            keep = model.sample_keep_indices(grid_thws, 0.5, generator=torch.Generator().manual_seed(args.seed))
            model.config._attn_implementation = "sdpa"
            dropped = time_call(lambda: model(pixel_values, grid_thws, keep_indices=keep).last_hidden_state,
                                device, args.warmup, args.repeats)
            report["token_dropping"] = {
                "workload": drop_name, "keep_fraction": keep.numel() / full["tokens"], "kept_tokens": keep.numel(),
                "tokens": full["tokens"], "median_s": dropped["median_s"], "times_s": dropped["times_s"],
                "full_median_s": full_s, "time_fraction": dropped["median_s"] / full_s,
            }
            print(f"[token dropping] {dropped['median_s']:.3f} s = {100 * dropped['median_s'] / full_s:.0f} % of full", flush=True)

    if do_compile and "mixed" in inputs_by_name:
        report["compile"] = benchmark_compile(model, *inputs_by_name["mixed"], report, device, args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=1, default=str))
    markdown = render_markdown(report)
    (out / "benchmark.md").write_text(markdown)
    plotted = plot(report, out / "benchmark.png")
    print()
    print(markdown)
    print(f"wrote {out / 'benchmark.json'}, {out / 'benchmark.md'}" + (f", {out / 'benchmark.png'}" if plotted else ""))
    return report


def _compiled_graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def benchmark_compile(model, pixel_values, grid_thws, report, device, args) -> dict:
    """torch.compile(model, dynamic=True) on the packed sdpa path: compile time, speed, agreement with eager mode, and
    whether a batch of another composition (the same images minus the last) reuses the compiled graphs."""
    model.config._attn_implementation = "sdpa"
    other_rows = int(grid_thws[:-1].prod(dim=1).sum())
    other = (pixel_values[:other_rows], grid_thws[:-1])
    try:
        compiled = torch.compile(model, dynamic=True)
        with torch.inference_mode():
            reference = model(pixel_values, grid_thws).last_hidden_state
            _sync(device)
            start = time.perf_counter()
            out = compiled(pixel_values, grid_thws).last_hidden_state
            _sync(device)
            first = time.perf_counter() - start
            diff = float((out.float() - reference.float()).abs().max())
            measured = time_call(  # no dispatch mode around a compiled graph
                lambda: compiled(pixel_values, grid_thws).last_hidden_state, device, args.warmup, args.repeats, False
            )
            graphs = _compiled_graph_count()
            start = time.perf_counter()
            compiled(*other)
            _sync(device)
            other_first = time.perf_counter() - start
            new_graphs = _compiled_graph_count() - graphs
    except Exception as err:  # report, don't crash the whole benchmark
        return {"workload": "mixed", "error": _error_text(err, 500)}
    eager = next(w for w in report["workloads"] if w["name"] == "mixed")
    eager_s = next((c.get("median_s") for c in eager["contenders"] if c["name"] == "packed-sdpa"), None)  # if timed
    print(f"[compile] first call {first:.1f} s, then {measured['median_s']:.3f} s (eager packed-sdpa: "
          f"{'not timed' if eager_s is None else f'{eager_s:.3f} s'}); new composition: {other_first:.2f} s, "
          f"{new_graphs} new graph(s)", flush=True)
    return {
        "workload": "mixed", "first_call_s": first, "median_s": measured["median_s"], "times_s": measured["times_s"],
        "eager_median_s": eager_s, "speedup_vs_eager": None if eager_s is None else eager_s / measured["median_s"],
        "max_abs_diff": diff,
        "new_composition": {"images": len(other[1]), "tokens": other_rows, "first_call_s": other_first,
                            "new_graphs": new_graphs},
    }


if __name__ == "__main__":
    main()
