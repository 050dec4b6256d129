# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Packed attention backends: one interface, dispatched once per model, over `cu_seqlens` (never a dense mask).

`flash_attention_2` runs flash-attn's varlen kernel; `sdpa` uses torch's varlen kernel on CUDA, chunked bf16
matmuls on a CPU that multiplies bf16 natively without AMX (`cpu_has_bf16_matmul`, `cpu_has_amx_bf16`), else one
`scaled_dot_product_attention` call per group of equal-length sequences; `eager` does matmul + softmax per sequence
(and can return the attention maps); any function registered with transformers' `AttentionInterface` runs per
sequence. Under torch.compile the built-in backends run inside one opaque custom op.

Also here: which dtype runs fast on a device (`preferred_dtype`), the one place that reads the CPU's features.
"""

import functools
import inspect
import math
import re
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .navit_layout import AttentionPartition, _partition_from_tensors


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Which dtype is fast here: bf16 where the hardware multiplies it natively, else fp32
# ----------------------------------------------------------------------------------------------------------------------

CPUINFO_PATH = "/proc/cpuinfo"
# x86 feature flags (as /proc/cpuinfo spells them) of native bf16 dot products: AVX512-BF16 (Zen 4, Cooper Lake and
# later) and AMX (Sapphire Rapids and later). Without them torch converts bf16 to fp32 around every GEMM, and a bf16
# matmul runs several times *slower* than an fp32 one.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_field(cpuinfo: str, names: tuple[str, ...]) -> str:
    """The value of the first `name : value` line of a /proc/cpuinfo text whose name is one of `names`, else ""."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in names:
            return value.strip()
    return ""


def _read_cpuinfo() -> Optional[str]:
    """This machine's /proc/cpuinfo text, or None where that file does not exist (macOS, Windows)."""
    try:
        with open(CPUINFO_PATH) as f:
            return f.read()
    except OSError:
        return None


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor listed in a /proc/cpuinfo text (x86 `flags`, Arm `Features`)."""
    return frozenset(_cpuinfo_field(cpuinfo, ("flags", "Features")).split())


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's vendor as /proc/cpuinfo spells it (`GenuineIntel`, `AuthenticAMD`, …), read once per process; "" where
    that file does not exist or does not say."""
    cpuinfo = _read_cpuinfo()
    return "" if cpuinfo is None else _cpuinfo_field(cpuinfo, ("vendor_id",))


def _cpu_bf16_flags() -> frozenset[str]:
    """Which of `BF16_CPU_FLAGS` this machine's CPU has, from /proc/cpuinfo; where that file does not exist (macOS,
    Windows), from torch's own CPU feature probes."""
    cpuinfo = _read_cpuinfo()
    if cpuinfo is not None:
        return frozenset(flag for flag in BF16_CPU_FLAGS if flag in cpu_flags(cpuinfo))
    cpu = getattr(torch._C, "_cpu", None)
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return frozenset(flag for flag, probe in probes.items() if bool(getattr(cpu, probe, lambda: False)()))


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_matmul() -> bool:
    """Whether this machine's CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16), read once per process."""
    return bool(_cpu_bf16_flags())


@functools.lru_cache(maxsize=None)
def cpu_has_amx_bf16() -> bool:
    """Whether this machine's CPU has AMX-BF16 tiles (Sapphire Rapids and later), read once per process. torch's fused
    CPU SDPA kernel multiplies bf16 on the tiles there, and beats explicit matmul attention (see
    `_cpu_matmul_attention_usable`)."""
    return "amx_bf16" in _cpu_bf16_flags()


def preferred_dtype_reason(device: Union[torch.device, str]) -> str:
    """Why `preferred_dtype(device)` is what it is, in a few words for a run's summary."""
    device = torch.device(device)
    if device.type == "cuda":
        return "this GPU supports bf16" if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support"
    if device.type != "cpu":
        return f"no bf16 detection for {device.type} devices"
    if cpu_has_bf16_matmul():
        return "this CPU multiplies bf16 natively (AVX512-BF16 or AMX)"
    return "this CPU has no native bf16 matmuls (no AVX512-BF16 or AMX): bf16 would run slower than fp32"


def preferred_dtype(device: Union[torch.device, str]) -> torch.dtype:
    """The dtype a forward runs fastest in on `device` at a bf16 accuracy cost that the benchmarks measure (min
    per-token cosine vs fp32 ≥ 0.999): bf16 on a CUDA GPU that supports it and on a CPU with native bf16 matmuls
    (`cpu_has_bf16_matmul`), fp32 everywhere else (a bf16 forward is slower there, not faster)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
    return torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# Attention backends. Each takes packed q, k, v [K, heads, head_dim] and an AttentionPartition and returns
# (output [K, heads, head_dim], per-sequence attention maps or None).
# ----------------------------------------------------------------------------------------------------------------------


def _grouped_attention(query, key, value, partition, kernel):
    """Run `kernel` on each batch of equal-length sequences ([n, heads, L, head_dim] views); restore token order."""
    if partition.regroup:
        index = partition.group_index  # row gathers use index_select: ~6x faster than x[index] on CPU
        query, key, value = query.index_select(0, index), key.index_select(0, index), value.index_select(0, index)
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
        output = output.index_select(0, partition.group_inverse)
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


# On a CPU with AVX512-BF16 but no AMX, torch's fused SDPA kernel still runs bf16 at fp32 speed, while explicit bf16
# matmuls run ~2.5× faster: QKᵀ, softmax and PV then take ~0.6-0.7× the SDPA time (so400m heads, 196-4,096 tokens).
# With AMX the fused kernel multiplies on the tiles and is the faster one: 16 heads of 72, 2 threads, ms, SDPA vs
# these chunks: 784 tokens 3.9 vs 5.9, 1,600: 15.7 vs 23.2, 4,096: 93 vs 157 (the softmax, not the matmuls, bounds
# both there), so AMX keeps SDPA.
# The scores are computed a chunk at a time, sized to stay in the CPU caches (a whole [heads, L, L] score tensor would
# make the softmax memory-bound and take GiBs for long sequences).
_CPU_ATTENTION_CHUNK_BYTES = 8 * 2**20  # scores of one chunk: (sequence, head) pairs × query rows × keys


def _cpu_inference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Attention on the CPU with nothing that needs gradients, no dropout, not traced by torch.compile."""
    return (
        query.device.type == "cpu"
        and dropout == 0.0
        and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
        and not torch.compiler.is_compiling()
    )


def _cpu_matmul_attention_usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Chunked bf16 matmul attention: CPU bf16 inference (it writes into reused buffers, so nothing may need
    gradients), no dropout, not traced, on a CPU that multiplies bf16 natively without AMX (with AMX, SDPA wins)."""
    return (
        query.dtype == torch.bfloat16
        and _cpu_inference(query, key, value, dropout)
        and cpu_has_bf16_matmul()
        and not cpu_has_amx_bf16()
    )


def chunked_matmul_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> torch.Tensor:
    """softmax(q·kᵀ·scaling)·v for `[n, heads, L, head_dim]` inputs (any strides) by explicit matmuls, one chunk of
    (sequence, head) pairs and query rows at a time: the chunk's scores `[pairs, rows, L]` stay within
    `_CPU_ATTENTION_CHUNK_BYTES`. The scale is applied in the matmul's accumulator; softmax accumulates in fp32 and
    writes probabilities in the input dtype. Returns `[n, heads, L, head_dim]`, contiguous."""
    n, heads, length, head_dim = query.shape
    pairs_total = n * heads
    q, k, v = (x.reshape(pairs_total, length, head_dim) for x in (query, key, value))  # [n·heads, L, head_dim]
    out = torch.empty_like(q)
    rows = max(1, _CPU_ATTENTION_CHUNK_BYTES // (length * q.element_size()))  # query rows of one chunk, all pairs
    pairs = max(1, rows // length)  # whole (sequence, head) pairs per chunk when they fit, else one pair
    rows = min(rows, length)
    scores = q.new_empty(pairs, rows, length)
    probs = torch.empty_like(scores)
    for p0 in range(0, pairs_total, pairs):
        p1 = min(p0 + pairs, pairs_total)
        keys_t = k[p0:p1].transpose(1, 2)  # [pairs, head_dim, L]
        for r0 in range(0, length, rows):
            r1 = min(r0 + rows, length)
            s, p = scores[: p1 - p0, : r1 - r0], probs[: p1 - p0, : r1 - r0]  # [pairs, rows, L]
            torch.baddbmm(s, q[p0:p1, r0:r1], keys_t, beta=0.0, alpha=scaling, out=s)
            torch.ops.aten._softmax.out(s, -1, False, out=p)
            torch.bmm(p, v[p0:p1], out=out[p0:p1, r0:r1])
    return out.view(n, heads, length, head_dim)


# torch's fused CPU attention in bf16/fp16 runs oneDNN micro-kernels that it compiles for each block shape it meets
# and keeps for the life of the process, in a per-thread cache without a bound: the tail blocks of every new
# sequence length add new ones (~4 MiB per new length on a 2-core AMX Xeon: 120 random lengths between 200 and
# 3,000 grew the process by 429 MiB). A job over images of many sizes would grow by GiBs. Padding each sequence to a
# multiple of `_CPU_SDPA_LENGTH_MULTIPLE` rows, with the padded keys masked out, keeps the block shapes within a
# small fixed set (the same 120 lengths: 56 MiB) and also spares the compilation each new length paid: ~15 % faster
# over those lengths, the same speed on repeated ones (docs/benchmarks.md). Masked keys add exact zeros to the
# softmax, and padded query rows are dropped.
_CPU_SDPA_LENGTH_MULTIPLE = 64


def _cpu_sdpa_lengths_padded(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Pad sequence lengths for torch's fused CPU attention: bf16/fp16 on the CPU, inference (no autograd), no
    dropout, not traced by torch.compile."""
    return query.dtype in (torch.bfloat16, torch.float16) and _cpu_inference(query, key, value, dropout)


def padded_cpu_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """SDPA of `[n, heads, L, head_dim]` inputs with L padded up to a multiple of `_CPU_SDPA_LENGTH_MULTIPLE`: the
    padded keys masked out (-inf scores), the padded query rows dropped. Returns `[n, heads, L, head_dim]`."""
    length = query.shape[2]
    padded = -(-length // _CPU_SDPA_LENGTH_MULTIPLE) * _CPU_SDPA_LENGTH_MULTIPLE
    if padded == length:
        return F.scaled_dot_product_attention(query, key, value, scale=scaling)
    q, k, v = (F.pad(x, (0, 0, 0, padded - length)) for x in (query, key, value))  # [n, heads, padded, head_dim]
    mask = query.new_zeros(1, 1, 1, padded)  # broadcast over sequences, heads and query rows
    mask[..., length:] = float("-inf")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)[:, :, :length]


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
    """torch varlen kernel on CUDA half precision; chunked bf16 matmuls on a CPU with AVX512-BF16 and no AMX
    (inference); else one SDPA call per group of equal-length sequences (in CPU half-precision inference, on lengths
    padded to a multiple of `_CPU_SDPA_LENGTH_MULTIPLE`)."""
    if _torch_varlen_usable(query, dropout):
        cu = partition.cu_seqlens
        out = _torch_varlen_attention()(
            query, key, value, cu, cu, partition.max_seqlen, partition.max_seqlen, scale=scaling
        )
        return out, None

    if _cpu_matmul_attention_usable(query, key, value, dropout):

        def kernel(q, k, v):
            return chunked_matmul_attention(q, k, v, scaling), None

    elif _cpu_sdpa_lengths_padded(query, key, value, dropout):

        def kernel(q, k, v):
            return padded_cpu_sdpa(q, k, v, scaling), None

    else:

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

