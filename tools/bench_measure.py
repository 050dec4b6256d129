# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""navit-benchmark, measurement: interleaved timing rounds, peak memory, FLOPs, the bare-matmul floors and the peak."""


import gc
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode



from ..configuration_siglip2_navit import Siglip2NavitConfig




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


@dataclass
class FreshEachCall:
    """A callable whose buffers are made (untimed) right before each call and freed right after it. A matmul floor's
    scratch buffers (GBs at full size) are then never resident while a contender runs (a large resident set slows the
    contenders' fresh allocations), yet the floor runs in the same rounds as the contenders, so a drift of the
    machine's load hits both alike and their ratio is paired round by round. Its memory is not measured."""

    make: Callable[[], Callable[[], object]]


def _timed_call(fn, device: torch.device) -> float:
    """One call of `fn` (made fresh first, untimed, when it is a FreshEachCall), its time on CLOCK."""
    run = fn.make() if isinstance(fn, FreshEachCall) else fn
    _sync(device)
    start = CLOCK()
    out = run()
    _sync(device)
    elapsed = CLOCK() - start
    del out, run
    return elapsed


def time_interleaved(
    fns: dict, device: torch.device, warmup: int, repeats: int, measure_memory: bool = True, keep_going: bool = False
) -> dict:
    """Time several callables side by side: each first runs once to measure its peak memory (unless not
    `measure_memory`, or it is a FreshEachCall) and `warmup` more times untimed (at least once in all when it had no
    memory call), then `repeats` rounds run every callable once, in turn, each round starting one callable later than
    the last (so that no callable always runs right after the same neighbour). A slow drift of the machine's load
    (other processes, thermal state) hits every contender alike instead of whichever ran last, and each round gives
    paired ratios. Per name: the median, the individual times (round order) and the peak memory of the first call.

    The clock is wall time, or with `--timer cpu` this process's CPU time (robust on a busy machine when run with
    `--threads 1`: time spent descheduled is not counted).

    With `keep_going`, a callable that raises in its first calls (out of memory, a broken optional kernel) is reported
    as `{"error": ...}` and left out of the rounds, so one failing contender does not cost the whole run."""
    results, failed = {}, {}
    for name, fn in fns.items():
        memory = PeakMemory(device)
        try:
            measured = measure_memory and not isinstance(fn, FreshEachCall)
            if measured:
                with memory:
                    out = fn()
                    del out
            # at least one untimed call before the rounds: a first call pays one-off costs (oneDNN/AMX kernel setup,
            # first-touch pages) that, in a round, would read as a slow outlier of that callable
            for _ in range(max(warmup, 0 if measured else 1)):
                _timed_call(fn, device)
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            if not keep_going:
                raise
            failed[name] = {"error": _error_text(err)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results[name] = {"times_s": [], "peak_memory_bytes": memory.peak}
    order = [name for name in fns if name not in failed]
    for round_index in range(repeats):
        shift = round_index % max(1, len(order))  # each round starts one callable later: no fixed position in a round
        for name in order[shift:] + order[:shift]:
            results[name]["times_s"].append(_timed_call(fns[name], device))
    for result in results.values():
        result["median_s"] = statistics.median(result["times_s"])
    return {**results, **failed}





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


PEAK_MATMUL_SIDE = {True: 8192, False: 2048}  # n of the n³ matmul that measures the peak: on CUDA, on CPU


def matmul_peak_run(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], int]:
    """One dense matmul of `dtype` into a preallocated output (8192³ on CUDA, 2048³ on CPU) and its FLOP: timed in
    the workloads' rounds, it gives the device's measured matmul peak, paired round by round with the contenders."""
    n = PEAK_MATMUL_SIDE[device.type == "cuda"]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2 * n**3


def matmul_floor(
    seq_lens: list[int], config: Siglip2NavitConfig, device: torch.device, dtype: torch.dtype, kind: str
) -> Callable[[], None]:
    """A callable that runs exactly the unavoidable matmuls of one forward, bare, into preallocated outputs: the
    matmuls `model_flops` counts.

    Once, the patch embedding [K, C·T·p·p] × [C·T·p·p, H]; per layer, on the K packed tokens: QKV (one fused
    [K, H] × [H, 3H]), out-proj, fc1, fc2 (no bias); and per group of equal-length sequences QKᵀ and PV as batched
    matmuls (split into chunks of ≤ 256 MiB of scores so that long sequences fit in memory). Nothing else: no bias,
    norm, activation, softmax, RoPE, PE, reordering.

    `kind` "floor-bmm" is that; "floor-sdpa" runs the same dense matmuls with the attention done by one bare
    `scaled_dot_product_attention` call per group instead. On CPU, torch's fused flash kernel can beat the bare
    QKᵀ/PV matmuls (it never writes the [L, L] scores to memory), so a model could run above 100 % of the bmm floor;
    the benchmark takes the faster of the two floors as the floor.
    """
    hidden, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    head_dim = hidden // heads
    tokens = sum(seq_lens)
    make = lambda *shape: torch.empty(*shape, device=device, dtype=dtype).normal_(0, 0.02)  # noqa: E731
    patch_width = config.num_channels * config.temporal_patch_size * config.patch_size**2
    patches, w_patch = make(tokens, patch_width), make(patch_width, hidden)
    x, w_qkv, w_o, w_1, w_2 = (
        make(tokens, hidden), make(hidden, 3 * hidden), make(hidden, hidden), make(hidden, inter), make(inter, hidden)
    )
    zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731 - outputs, paged in untimed
    qkv_out, o_out, h_out = zeros(tokens, 3 * hidden), zeros(tokens, hidden), zeros(tokens, inter)

    groups: dict[int, int] = {}
    for n in seq_lens:
        groups[n] = groups.get(n, 0) + 1
    element_bytes = torch.finfo(dtype).bits // 8
    if kind == "floor-sdpa":
        sdpa_jobs = [tuple(make(count, heads, length, head_dim) for _ in range(3)) for length, count in groups.items()]
    bmm_jobs = []  # (q, kᵀ, v, scores, out) per chunk of (sequences × heads); chunks of one shape share buffers
    buffers: dict = {}
    for length, count in groups.items() if kind == "floor-bmm" else ():
        chunk = max(1, min(count * heads, (256 << 20) // (length * length * element_bytes)))
        remaining = count * heads
        while remaining > 0:
            b = min(chunk, remaining)
            if (b, length) not in buffers:
                buffers[(b, length)] = (
                    make(b, length, head_dim), make(b, head_dim, length), make(b, length, head_dim),
                    zeros(b, length, length), zeros(b, length, head_dim),
                )
            bmm_jobs.append(buffers[(b, length)])
            remaining -= b

    def dense():
        torch.mm(x, w_qkv, out=qkv_out)
        torch.mm(x, w_o, out=o_out)
        torch.mm(x, w_1, out=h_out)
        torch.mm(h_out, w_2, out=o_out)

    def bmm_forward():
        torch.mm(patches, w_patch, out=x)
        for _ in range(config.num_hidden_layers):
            dense()
            for q, kt, v, scores, out in bmm_jobs:
                torch.bmm(q, kt, out=scores)
                torch.bmm(scores, v, out=out)

    def sdpa_forward():
        torch.mm(patches, w_patch, out=x)
        for _ in range(config.num_hidden_layers):
            dense()
            for q, k, v in sdpa_jobs:
                F.scaled_dot_product_attention(q, k, v)

    return {"floor-bmm": bmm_forward, "floor-sdpa": sdpa_forward}[kind]


