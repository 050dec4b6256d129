# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Side-by-side benchmark of the packed SigLIP2 NaViT encoder against its matmul floor and transformers' padded naflex.

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

dtypes: `--dtype fp32` (CPU default) runs every contender in fp32; `--dtype bf16` (CUDA default) runs them in bf16
(`.to(torch.bfloat16)`) plus the fp32 packed-sdpa as the reference for the bf16 speed-up (paired per round) and
accuracy (min per-token cosine vs fp32); `--dtype both` runs every contender in each. Each dtype has its own floor.

Timing is interleaved: per workload, `--repeats` rounds each run every callable once (rotated by one per round):
the contenders, both matmul floors (bare matmuls into buffers made, untimed, just before each floor call and freed
right after it) and a dense matmul that measures the device's peak. A drift of the machine's load therefore hits
everything alike, and every ratio (× vs naflex-padded, packed vs per-image, fraction of the floor and of the peak,
bf16 vs fp32, token dropping) is paired round by round.

Every figure is reported as median (min–max) over the rounds. A ratio is printed as a result only when every round
puts it on the same side of 1; rounds within 1 ± 2 % are a "tie"; rounds straddling 1 by more are "noisy" (not a
result); a fraction of a floor or a peak above 100 % is a "measurement error". The stated targets (named by what
they demand, e.g. "≥ 3× padded naflex", "bf16 ≥ 85 % of its matmul floor") are judged the same way: met (every round), MISSED (no round), noisy (rounds straddle the target); the summary
lists them, and `--fail-on-missed` makes a MISSED target exit with status 1 (default: exit 0).

Also reported: tokens/s (real tokens), achieved FLOP/s, peak memory of the first call (CPU: peak live tensor bytes,
see `LiveTensorBytes`; CUDA: torch.cuda.max_memory_allocated), token dropping (keep 50 %) and torch.compile. Writes
`<out>/benchmark.json`, `<out>/benchmark.md`, and `<out>/benchmark.png` when matplotlib is installed
(`pip install 'siglip2-navit[bench]'`).

    navit-benchmark --quick                  # so400m widths, 1 layer, 3 images (time: see --quick below)
    navit-benchmark --quick --dtype bf16     # the same in bf16 against the fp32 reference
    navit-benchmark --layers 1               # so400m widths, 1 of 27 layers, every workload
    navit-benchmark --device cuda            # bf16 on a GPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


from . import convert_siglip2_naflex, visualize
from ..configuration_siglip2_navit import Siglip2NavitConfig
from ..image_processing_siglip2_navit import Siglip2NavitImageProcessor
from ..modeling_siglip2_navit import Siglip2NavitModel
from ..navit_batching import naflex_patch_order
from .cpu_allocator import CPU_ALLOCATOR_CHOICES, apply_cpu_allocator
from .dtypes import DTYPES as TOOL_DTYPES
from .dtypes import resolve_dtype
from . import bench_measure, bench_report, bench_stats  # noqa: F401  (bench_report, bench_stats: for tests and users)
from .bench_measure import (  # noqa: F401  (PeakMemory: part of this module's API, as before the split)
    CLOCKS,
    FreshEachCall,
    PeakMemory,
    _error_text,
    _sync,
    matmul_floor,
    matmul_peak_run,
    model_flops,
    time_interleaved,
)
from .bench_report import _fmt_time, _label, machine_description, plot, render_markdown
from .bench_stats import _contender, evaluate_targets, exact, format_ratio, paired_ratio, spread, summarize, with_verdict


# ----------------------------------------------------------------------------------------------------------------------
# Configurations and workloads
# ----------------------------------------------------------------------------------------------------------------------

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
QUICK = SO400M  # --quick: the real widths (a toy width would measure Python overhead), with fewer layers and images
QUICK_LAYERS = 1
QUICK_MEASURED = "about 30 s on 2 idle CPU cores, measured; 68-125 s while other jobs shared the 2 cores"
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
        return [
            Workload("mixed", mixed_sizes(3, 448, 640)),  # 784 + 1,056 + 1,600 tokens
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


def naflex_to_navit_state_dict(state_dict: dict, num_channels: int, patch_size: int) -> dict:
    """naflex weights -> this model's: prefix `vision_model.`, Linear patch embedding [hidden, p·p·C] -> Conv2d
    layout [hidden, C, p, p]."""
    converted = {}
    for name, value in state_dict.items():
        name = name if name.startswith("vision_model.") else "vision_model." + name
        if name == "vision_model.embeddings.patch_embedding.weight":
            value = convert_siglip2_naflex.patch_embedding_to_conv(value, num_channels, patch_size)
        converted[name] = value.contiguous()
    return converted


def build_models(size: dict, layers: Optional[int], seed: int, with_ovis: bool):
    """transformers' naflex Siglip2VisionModel with random weights, and this model with those weights copied through
    the naflex conversion mapping (tools/convert_siglip2_naflex.py; config from its
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
    vision = convert_siglip2_naflex.vision_config_of(naflex_config.to_dict())
    config = Siglip2NavitConfig(**convert_siglip2_naflex.navit_config_kwargs(vision, hidden_stride=2))
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
    """Per image: the packed rows of its patches in raster order (each frame is packed in `stride x stride` blocks,
    see `navit_image_utils.block_order_position`)."""
    indices, offset = [], 0
    for t, h, w in grids:
        assert t == 1, "the naflex baseline handles single-frame images only"
        indices.append(offset + visualize.raster_index(h, w, stride))
        offset += h * w
    return indices


def naflex_inputs(pixel_values: torch.Tensor, grids: list, num_channels: int, patch_size: int, stride: int):
    """The padded naflex batch: [B, max_patches, p·p·C] patches in raster order, the mask and spatial shapes."""
    indices = raster_index(grids, stride)
    max_patches = max(len(i) for i in indices)
    width = num_channels * patch_size * patch_size
    to_naflex = naflex_patch_order(num_channels, patch_size).argsort()  # [C·p·p]
    padded = pixel_values.new_zeros(len(indices), max_patches, width)
    mask = torch.zeros(len(indices), max_patches, dtype=torch.long)
    for b, index in enumerate(indices):
        padded[b, : len(index)] = pixel_values[index][:, to_naflex]
        mask[b, : len(index)] = 1
    spatial_shapes = torch.tensor([[h, w] for _, h, w in grids], dtype=torch.long)
    return padded, mask, spatial_shapes, indices


# ----------------------------------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    run: Callable[[], object]
    note: str = ""
    padded_tokens: Optional[int] = None


def sync_per_layer_hooks(model: Siglip2NavitModel) -> list:
    """The reference design: each layer reads its sequence lengths back to the host (`.tolist()`), one sync/layer."""

    def hook(module, args):
        args[1].partition.cu_seqlens.diff().max().item()  # args: (hidden_states, AttentionContext)

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

DTYPES = {name: TOOL_DTYPES[name] for name in ("fp32", "bf16")}  # the dtypes the benchmark compares
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "fp32": "fp32", "bf16": "bf16", "both": "both"}
QUICK_CONTENDERS = ("packed-sdpa", "per-image-sdpa", "naflex-padded")
QUICK_BF16_CONTENDERS = ("packed-sdpa", "per-image-sdpa")  # naflex-padded in bf16 only when asked for (--contenders)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"so400m widths, {QUICK_LAYERS} layer, few images, the headline contenders only "
                             f"({QUICK_MEASURED})")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (widths unchanged)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPE_ALIASES)],
                        help="auto (default): bf16 on a CUDA GPU or a CPU with native bf16 matmuls (AVX512-BF16/AMX), "
                             "else fp32; bf16: every contender in bf16 plus the fp32 packed-sdpa reference for the "
                             "bf16 speed-up and accuracy; fp32; both: every contender in each")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--cpu-allocator", choices=CPU_ALLOCATOR_CHOICES, default="default",
                        help="default (default): glibc's own malloc settings, as in any process that imports the "
                             "model; retain: glibc keeps freed memory for reuse, as navit-encode runs on CPU")
    parser.add_argument("--timer", choices=sorted(CLOCKS), default="wall",
                        help="wall clock, or process CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls after the memory call (default 1, "
                        "0 with --quick: the memory call warms up)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (default 5)")
    parser.add_argument("--workloads", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--contenders", default=None,
                        help="comma-separated names to run (default: all available; with --quick: "
                             f"{','.join(QUICK_CONTENDERS)}, in bf16 {','.join(QUICK_BF16_CONTENDERS)})")
    parser.add_argument("--all-contenders", action="store_true",
                        help="also run the CUDA-only contenders on CPU (exercises their code path)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="benchmark torch.compile (default: on, off with --quick)")
    parser.add_argument("--eager-max-seq", type=int, default=8192,
                        help="skip packed-eager when a sequence is longer (its [heads, L, L] maps)")
    parser.add_argument("--fail-on-missed", action="store_true",
                        help="exit with status 1 when a stated target is MISSED (default: exit 0, misses printed)")
    parser.add_argument("--out", default=str(Path("out") / "benchmark"))
    parser.add_argument("--title", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.warmup is not None and args.warmup < 0):
        parser.error(f"--repeats must be ≥ 1 and --warmup ≥ 0, got {args.repeats} and {args.warmup}")
    return args


def _check_names(kind: str, names: set[str], known: list[str]) -> None:
    unknown = names - set(known)
    if unknown:
        raise SystemExit(f"error: unknown --{kind} {sorted(unknown)}; choose from {', '.join(known)}")


def selected_workloads(args: argparse.Namespace) -> list[Workload]:
    selected = workloads(args.quick)
    if args.workloads:
        names = set(args.workloads.split(","))
        _check_names("workloads", names, [w.name for w in selected])
        selected = [w for w in selected if w.name in names]
    return selected


def selected_contenders(args: argparse.Namespace, dtypes: list[str]) -> list[tuple[str, str]]:
    """(name, dtype) of every contender to run. With bf16 and packed-sdpa among them, the fp32 packed-sdpa runs too:
    the reference of the bf16 speed-up and accuracy figures."""
    if args.contenders is not None:
        names = args.contenders.split(",")
        _check_names("contenders", set(names), list(CONTENDER_NAMES))
    else:
        names = list(QUICK_CONTENDERS if args.quick else CONTENDER_NAMES)
    chosen = [(name, dtype) for dtype in dtypes for name in names
              if args.contenders is not None or not args.quick or dtype == "fp32" or name in QUICK_BF16_CONTENDERS]
    if "bf16" in dtypes and "packed-sdpa" in names and ("packed-sdpa", "fp32") not in chosen:
        chosen.insert(0, ("packed-sdpa", "fp32"))
    return chosen


def run_dtypes(args: argparse.Namespace, device: torch.device) -> tuple[list[str], str]:
    """The dtypes to run and the summary line that says which and why (`--dtype auto`: see `resolve_dtype`)."""
    if args.dtype == "auto":
        choice, line = resolve_dtype("auto", device)
    else:
        choice = DTYPE_ALIASES[args.dtype]
        line = f"dtype: {choice} (set by --dtype {args.dtype})"
    return (["fp32", "bf16"] if choice == "both" else [choice]), line


@dataclass
class Models:
    """One dtype's copies of the three models (None where no contender of that dtype needs one)."""

    navit: Siglip2NavitModel
    naflex: Optional[torch.nn.Module]
    ovis: Optional[Siglip2NavitModel]


def models_by_dtype(args: argparse.Namespace, chosen: list[tuple[str, str]], device: torch.device) -> dict:
    """The models each dtype's contenders need, all with the same (fp32-initialised) weights: fp32 uses the built
    models themselves, bf16 casts copies (so a full so400m run holds one fp32 copy of each model, not two)."""
    size = QUICK if args.quick else SO400M
    layers = args.layers if args.layers is not None else (QUICK_LAYERS if args.quick else None)
    needs = lambda name, dtype: (name, dtype) in chosen  # noqa: E731
    model, naflex, ovis = build_models(size, layers, args.seed, any(n == "packed-sdpa-ovis" for n, _ in chosen))
    result = {}
    for dtype in dict.fromkeys(d for _, d in chosen):
        cast = lambda m: (m if dtype == "fp32" else copy.deepcopy(m)).to(device=device, dtype=DTYPES[dtype])  # noqa
        result[dtype] = Models(
            navit=cast(model),
            naflex=cast(naflex) if needs("naflex-padded", dtype) else None,
            ovis=cast(ovis) if ovis is not None and needs("packed-sdpa-ovis", dtype) else None,
        )
    return result


FLOOR_KINDS = ("floor-bmm", "floor-sdpa")


def reference_runs(seq_lens: list[int], config, device: torch.device, dtypes: list[str]) -> tuple[dict, dict]:
    """Per dtype, the callables timed in the same rounds as the contenders: both matmul floors (buffers made fresh
    for each call) and the dense matmul that measures the device's peak. Returns them keyed by (kind, dtype), and
    the FLOP of one peak call per dtype."""
    runs, peak_flop = {}, {}
    for dtype in dtypes:
        for kind in FLOOR_KINDS:
            runs[(kind, dtype)] = FreshEachCall(
                lambda kind=kind, dtype=dtype: matmul_floor(seq_lens, config, device, DTYPES[dtype], kind))
        runs[("matmul-peak", dtype)], peak_flop[dtype] = matmul_peak_run(device, DTYPES[dtype])
    return runs, peak_flop


def floors_of(timed: dict, dtypes: list[str]) -> dict:
    """Per dtype: the floor is the faster of the two floors by median; both kept with their spreads."""
    floors = {}
    for dtype in dtypes:
        kinds = {kind: timed[(kind, dtype)]["times_s"] for kind in FLOOR_KINDS if "times_s" in timed[(kind, dtype)]}
        if not kinds:
            continue
        kind = min(kinds, key=lambda k: statistics.median(kinds[k]))
        floors[dtype] = {"kind": kind, **spread(kinds[kind]), "times_s": kinds[kind],
                         "all": {k: {**spread(v), "times_s": v} for k, v in kinds.items()}}
    return floors


def contender_runs(models: dict, chosen, pixel_values, grid_thws, seq_lens, args) -> tuple[dict, list]:
    """The callables to time, keyed by (name, dtype), and the Contender objects with their skip reasons."""
    runs, listed = {}, []
    for dtype, m in models.items():
        inputs = pixel_values.to(dtype=DTYPES[dtype])
        for contender in contenders_for(m.navit, m.ovis, m.naflex, inputs, grid_thws, args.all_contenders):
            key = (contender.name, dtype)
            if key not in chosen:
                continue
            skipped = None
            if contender.name == "packed-eager" and max(seq_lens) > args.eager_max_seq:
                skipped = f"skipped (sequence > {args.eager_max_seq})"
            else:
                runs[key] = contender.run
            listed.append((contender, dtype, skipped))
    return runs, listed


def contender_entry(contender: Contender, dtype: str, measured: dict, w: dict, timed: dict) -> dict:
    """The figures of one timed contender: time spread, tokens/s, fraction of its dtype's floor and of the measured
    matmul peak (both paired round by round: the floors and the peak matmul run in the same rounds)."""
    times = measured["times_s"]
    median = statistics.median(times)
    entry = {
        "name": contender.name, "dtype": dtype, "note": contender.note, "times_s": times, "median_s": median,
        "time_s": spread(times), "peak_memory_bytes": measured["peak_memory_bytes"],
        "tokens_per_s": w["tokens"] / median, "achieved_flops": w["flops"] / median,
    }
    peak = w["matmul_peak"].get(dtype)
    if peak is not None:
        fraction = paired_ratio(timed[("matmul-peak", dtype)], measured)
        scale = w["flops"] / peak["flop"]
        scaled = {**fraction, **{k: fraction[k] * scale for k in ("median", "min", "max")}}
        entry["of_matmul_peak"] = with_verdict(scaled, bounded_by_one=True)
    floor = w["floors"].get(dtype)
    if floor is not None:
        entry["of_floor"] = with_verdict(paired_ratio(floor, measured), bounded_by_one=True)
    if contender.padded_tokens is not None:
        entry["padded_tokens"] = contender.padded_tokens
    return entry


def add_paired_figures(w: dict, timed: dict, dtypes: list[str]) -> None:
    """Ratios of contenders timed in the same rounds: vs naflex-padded, packed vs per-image, vs sync-per-layer,
    bf16 vs fp32 speed."""
    ok = lambda key: "times_s" in timed.get(key, {})  # noqa: E731
    for c in w["contenders"]:
        baseline = ("naflex-padded", c["dtype"])
        if "error" not in c and ok(baseline):
            c["vs_naflex_padded"] = with_verdict(paired_ratio(timed[baseline], timed[(c["name"], c["dtype"])]))
    for dtype in dtypes:
        packed = ("packed-sdpa", dtype)
        for other, key in (("per-image-sdpa", "packed_vs_per_image"), ("packed-sdpa-sync-per-layer",
                                                                        "packed_vs_sync_per_layer")):
            if ok(packed) and ok((other, dtype)):
                w.setdefault(key, {})[dtype] = with_verdict(paired_ratio(timed[(other, dtype)], timed[packed]))
    if ok(("packed-sdpa", "fp32")) and ok(("packed-sdpa", "bf16")):
        w.setdefault("bf16_vs_fp32", {})["speedup"] = with_verdict(
            paired_ratio(timed[("packed-sdpa", "fp32")], timed[("packed-sdpa", "bf16")]))
        floors = w.get("floors", {})
        if "fp32" in floors and "bf16" in floors:  # what the hardware gives bf16, measured in the same rounds
            w["bf16_vs_fp32"]["floor_ratio"] = paired_ratio(floors["fp32"], floors["bf16"])
            rounds = zip(timed[("packed-sdpa", "fp32")]["times_s"], timed[("packed-sdpa", "bf16")]["times_s"],
                         floors["fp32"]["times_s"], floors["bf16"]["times_s"])
            kept = [(fp32 / bf16) / (floor32 / floor16) for fp32, bf16, floor32, floor16 in rounds]
            w["bf16_vs_fp32"]["speedup_of_floor_ratio"] = {**spread(kept), "paired": True}


def bf16_accuracy(models: dict, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> dict:
    """The bf16 model's packed-sdpa output vs the fp32 model's on the same inputs: min per-token cosine similarity
    (over every real token) and max abs difference."""
    outputs = []
    for dtype in ("fp32", "bf16"):
        model = models[dtype].navit
        model.config._attn_implementation = "sdpa"
        outputs.append(model(pixel_values.to(DTYPES[dtype]), grid_thws).last_hidden_state.float())
    cosine = F.cosine_similarity(outputs[0], outputs[1], dim=-1)
    difference = float((outputs[0] - outputs[1]).abs().max())
    return {"min_token_cosine": exact(float(cosine.min())), "max_abs_diff": difference}


def run_workload(
    workload: Workload, models: dict, chosen, args, device, dtypes: list[str], with_dropping: bool
) -> tuple[dict, tuple]:
    """Floors, then every contender in interleaved rounds (with token dropping in the primary dtype when
    `with_dropping` and packed-sdpa runs), then the figures derived from them."""
    pixel_values, grid_thws = make_inputs(workload, args.seed)
    pixel_values = pixel_values.to(device)
    grids = [tuple(g) for g in grid_thws.tolist()]
    seq_lens = [h * w for t, h, w in grids for _ in range(t)]
    cfg = next(iter(models.values())).navit.config
    w = {"name": workload.name, "images": len(grids), "grids": grids, "tokens": sum(seq_lens),
         "flops": model_flops(grids, cfg), "contenders": []}
    w["padded_flop_ratio"] = model_flops([(1, 1, max(seq_lens))] * len(seq_lens), cfg) / w["flops"]
    print(f"[{workload.name}] {len(grids)} images, {w['tokens']} tokens, longest {max(seq_lens)}", flush=True)
    references, peak_flop = reference_runs(seq_lens, cfg, device, list(models))
    runs, listed = contender_runs(models, chosen, pixel_values, grid_thws, seq_lens, args)
    with_dropping = with_dropping and ("packed-sdpa", dtypes[0]) in runs
    if with_dropping:
        runs[("token-dropping", dtypes[0])], kept = token_dropping_run(
            models[dtypes[0]].navit, dtypes[0], pixel_values, grid_thws, args.seed)
    timed = time_interleaved({**references, **runs}, device, args.warmup, args.repeats, keep_going=True)
    del references
    w["floors"] = floors_of(timed, list(models))  # a bf16 run also times the fp32 floor (of its fp32 reference)
    w["matmul_peak"] = {}
    for dtype, flop in peak_flop.items():
        times = timed[("matmul-peak", dtype)].get("times_s")
        if times:
            w["matmul_peak"][dtype] = {"flop": flop, "times_s": times, **spread([flop / t for t in times])}
    for contender, dtype, skipped in listed:
        error = skipped or timed[(contender.name, dtype)].get("error")
        if error:
            w["contenders"].append({"name": contender.name, "dtype": dtype, "error": error})
        else:
            w["contenders"].append(contender_entry(contender, dtype, timed[(contender.name, dtype)], w, timed))
        print(f"  {_label(contender.name, dtype):36s} {error or _fmt_time(w['contenders'][-1]['time_s'])}", flush=True)
    add_paired_figures(w, timed, dtypes)
    if with_dropping:
        w["token_dropping"] = token_dropping_figure(w, timed, dtypes[0], kept)
    for dtype, m in models.items():
        if m.naflex is not None and "error" not in timed.get(("naflex-padded", dtype), {"error": "not run"}):
            try:  # the padded batch once more, outside the timed rounds: may still fail (out of memory)
                w.setdefault("naflex_max_abs_diff", {})[dtype] = naflex_agreement(
                    m.navit, m.naflex, pixel_values.to(DTYPES[dtype]), grid_thws)
            except Exception as err:  # noqa: BLE001 - reported, not hidden
                w.setdefault("naflex_agreement_error", {})[dtype] = _error_text(err)
    if "speedup" in w.get("bf16_vs_fp32", {}):
        w["bf16_vs_fp32"].update(bf16_accuracy(models, pixel_values, grid_thws))
    return w, (pixel_values, grid_thws)


def pooled_peaks(workloads: list[dict]) -> dict:
    """Per dtype: the matmul peak's FLOP/s over every round of every workload."""
    samples: dict[str, list[float]] = {}
    for w in workloads:
        for dtype, peak in w["matmul_peak"].items():
            samples.setdefault(dtype, []).extend(peak["flop"] / t for t in peak["times_s"])
    return {dtype: spread(values) for dtype, values in samples.items()}


def memory_scaling(report: dict, dtype: str) -> Optional[dict]:
    """packed-sdpa's peak memory over the scaling workloads: the largest vs linear growth from the next smaller."""
    scaling = {}
    for w in report["workloads"]:
        c = _contender(w, "packed-sdpa", dtype)
        if w["name"].startswith("scaling-") and c is not None and c.get("peak_memory_bytes"):
            scaling[w["name"]] = c["peak_memory_bytes"]
    if len(scaling) < 2:
        return None
    names = sorted(scaling, key=lambda n: int(n.split("-")[1]))
    big, small = names[-1], names[-2]
    factor = int(big.split("-")[1]) / int(small.split("-")[1])
    return {"peaks": {n: scaling[n] for n in names}, "ratio_vs_linear": scaling[big] / (factor * scaling[small])}


def token_dropping_run(model: Siglip2NavitModel, dtype: str, pixel_values, grid_thws, seed: int):
    """packed-sdpa keeping 50 % of the tokens (a fixed random sample), to be timed in the same rounds as packed-sdpa."""
    pixel_values = pixel_values.to(DTYPES[dtype])
    keep = model.sample_keep_indices(grid_thws, 0.5, generator=torch.Generator().manual_seed(seed))

    def run():
        model.config._attn_implementation = "sdpa"
        return model(pixel_values, grid_thws, keep_indices=keep).last_hidden_state

    return run, keep.numel()


def token_dropping_figure(w: dict, timed: dict, dtype: str, kept_tokens: int) -> Optional[dict]:
    """Token dropping vs the full packed-sdpa forward of the same rounds (a paired ratio), or None if either failed."""
    dropped, full = timed.get(("token-dropping", dtype), {}), timed.get(("packed-sdpa", dtype), {})
    if "times_s" not in dropped or "times_s" not in full:
        return None
    result = {"workload": w["name"], "dtype": dtype, "keep_fraction": kept_tokens / w["tokens"],
              "kept_tokens": kept_tokens, "tokens": w["tokens"], "time_s": spread(dropped["times_s"]),
              "time_fraction": paired_ratio(dropped, full)}
    print(f"  {'token dropping (keep 50 %)':36s} {_fmt_time(result['time_s'])}: "
          f"{format_ratio(result['time_fraction'], '%')} of the full forward", flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    bench_measure.CLOCK = CLOCKS[args.timer]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    device = torch.device(args.device)
    allocator_line = apply_cpu_allocator(args.cpu_allocator, device.type)  # before any model or buffer exists
    if allocator_line:
        print(allocator_line, flush=True)
    dtypes, dtype_line = run_dtypes(args, device)
    do_compile = (not args.quick) if args.compile is None else args.compile
    chosen = selected_contenders(args, dtypes)
    selected = selected_workloads(args)
    print(dtype_line, flush=True)
    models = models_by_dtype(args, chosen, device)
    primary = models[dtypes[0]].navit
    cfg = primary.config
    description = (
        f"so400m widths (hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, {cfg.num_attention_heads} heads, "
        f"patch {cfg.patch_size}), {cfg.num_hidden_layers} layer(s), naflex-equivalent (no RoPE, bilinear+antialias "
        f"16×16 PE), hidden_stride {cfg.hidden_stride}"
    )
    report = {
        "title": args.title or f"siglip2-navit benchmark ({'quick' if args.quick else 'full'}, {device.type}, "
                               f"{'+'.join(dtypes)})",
        "machine": machine_description(device),
        "dtypes": dtypes,
        "dtype_line": dtype_line,
        "cpu_allocator": "retain" if allocator_line else "default",
        "allocator_line": allocator_line,
        "device": device.type,
        "config_description": description,
        "config": {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")},
        "timer": args.timer, "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
        "workloads": [],
    }
    inputs_by_name = {}
    with torch.inference_mode():
        drop_name = "mixed" if any(w.name == "mixed" for w in selected) else selected[0].name
        for workload in selected:
            entry, inputs_by_name[workload.name] = run_workload(
                workload, models, chosen, args, device, [d for d in dtypes if d in models],
                with_dropping=workload.name == drop_name)
            if entry.get("token_dropping"):
                report["token_dropping"] = entry.pop("token_dropping")
            report["workloads"].append(entry)
            gc.collect()
        report["memory_scaling"] = memory_scaling(report, dtypes[0])
    report["matmul_peak"] = pooled_peaks(report["workloads"])
    if do_compile and "mixed" in inputs_by_name:
        report["compile"] = benchmark_compile(primary, *inputs_by_name["mixed"], dtypes[0], device, args)
    report["targets"] = evaluate_targets(report)
    report["summary"] = summarize(report)
    report["wall_s"] = time.perf_counter() - started
    write_report(report, Path(args.out))
    return report


def write_report(report: dict, out: Path) -> None:
    """benchmark.json, benchmark.md (and .png), each written to a temporary name and then renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(report)
    for name, text in (("benchmark.json", json.dumps(report, indent=1, default=str)), ("benchmark.md", markdown)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plotted = plot(report, out / "benchmark.png")
    print()
    print(markdown)
    print(f"wrote {out / 'benchmark.json'}, {out / 'benchmark.md'}" + (f", {out / 'benchmark.png'}" if plotted else ""))


def _compiled_graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def benchmark_compile(model, pixel_values, grid_thws, dtype: str, device, args) -> dict:
    """torch.compile(model, dynamic=True) on the packed sdpa path: compile time, speed vs eager (timed in the same
    rounds), agreement with eager mode, and whether a batch of another composition (the same images minus the last)
    reuses the compiled graphs."""
    model.config._attn_implementation = "sdpa"
    pixel_values = pixel_values.to(DTYPES[dtype])
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
            timed = time_interleaved(  # no dispatch mode around a compiled graph
                {"compiled": lambda: compiled(pixel_values, grid_thws).last_hidden_state,
                 "eager": lambda: model(pixel_values, grid_thws).last_hidden_state},
                device, args.warmup, args.repeats, measure_memory=False,
            )
            graphs = _compiled_graph_count()
            start = time.perf_counter()
            compiled(*other)
            _sync(device)
            other_first = time.perf_counter() - start
            new_graphs = _compiled_graph_count() - graphs
    except Exception as err:  # report, don't crash the whole benchmark
        return {"workload": "mixed", "error": _error_text(err, 500)}
    speedup = with_verdict(paired_ratio(timed["eager"], timed["compiled"]))
    print(f"[compile] first call {first:.1f} s, then {_fmt_time(spread(timed['compiled']['times_s']))} s, "
          f"vs eager {format_ratio(speedup)}; new composition: {other_first:.2f} s, {new_graphs} new graph(s)",
          flush=True)
    return {
        "workload": "mixed", "dtype": dtype, "first_call_s": first, "time_s": spread(timed["compiled"]["times_s"]),
        "eager_time_s": spread(timed["eager"]["times_s"]), "speedup_vs_eager": speedup, "max_abs_diff": diff,
        "new_composition": {"images": len(other[1]), "tokens": other_rows, "first_call_s": other_first,
                            "new_graphs": new_graphs},
    }


def cli(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; exit status 1 with `--fail-on-missed` when a target was MISSED, else 0."""
    report = main(argv)
    fail = parse_args(argv).fail_on_missed and bool(report["summary"]["missed"])
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(cli())
