"""Memory settings of CPU inference jobs: glibc malloc keeps freed memory for reuse (`retain_freed_memory`), and
torch's CPU matmul kernel caches stay bounded (`bound_kernel_caches`).

A CPU forward allocates and frees many large tensors (each layer's q, k, v, attention output, MLP pieces: MiBs each).
With glibc's default settings, malloc serves the larger ones with fresh `mmap`s and trims the heap once enough
memory at its top is free, so the next allocation of the same size page-faults its memory in again (and the kernel
zeroes every page): tens of thousands of minor faults per forward, ~5 % of a so400m-width CPU forward (measured in
docs/benchmarks.md). Serving blocks of up to `MMAP_THRESHOLD_BYTES` from the heap and never trimming it keeps them
mapped: the next forward reuses them without a fault. The cost: the process keeps its peak heap instead of giving
freed memory back to the OS.

This changes the whole process's allocator, so the library never does it on its own; `navit-encode` (and its Ray
actors) do it for CPU runs unless `--cpu-allocator default`, and `navit-benchmark --cpu-allocator retain` measures
it. In your own process, `retain_freed_memory()` before the first forward, or the environment variables
`MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=2147483647`, do the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 64 * 2**20  # blocks up to this size come from the heap (glibc's own threshold: at most 32 MiB)
FALLBACK_MMAP_THRESHOLD_BYTES = 32 * 2**20  # the largest value every 64-bit glibc accepts
NEVER_TRIM_BYTES = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB at the heap's top are free

CPU_ALLOCATOR_CHOICES = ("retain", "default")


def retain_freed_memory() -> Optional[str]:
    """Set glibc malloc to keep freed memory mapped (heap blocks up to 64 MiB, no trimming); returns the line that
    says what was set, or None where it does not apply (not glibc, e.g. macOS or musl; or mallopt refused)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    sizes = (MMAP_THRESHOLD_BYTES, FALLBACK_MMAP_THRESHOLD_BYTES)
    threshold = next((size for size in sizes if mallopt(M_MMAP_THRESHOLD, size) == 1), None)
    if threshold is None or mallopt(M_TRIM_THRESHOLD, NEVER_TRIM_BYTES) != 1:
        return None
    return (f"allocator: glibc keeps freed memory for reuse (heap blocks up to {threshold >> 20} MiB, no trimming; "
            "--cpu-allocator default turns it off)")


def _is_cpu(device: str) -> bool:
    return str(device).split(":")[0] == "cpu"


def apply_cpu_allocator(choice: str, device: str) -> Optional[str]:
    """`retain_freed_memory()` for `choice` "retain" on a CPU device; the line saying so, or None."""
    if choice not in CPU_ALLOCATOR_CHOICES:
        raise ValueError(f"cpu allocator {choice!r}: expected one of {CPU_ALLOCATOR_CHOICES}")
    if choice != "retain" or not _is_cpu(device):
        return None
    return retain_freed_memory()


# torch's CPU matmuls cache what they compile per GEMM shape: oneDNN a primitive (up to 1,024 by default, each with
# its own buffers: 1-18 MiB measured at so400m widths in bf16) and ideep its parameters (up to 1,024). A job over
# images of many sizes meets new token counts with every batch, so with the defaults the process grows towards GiBs
# of cached kernels it will rarely use again. What a cache must hold is one batch's shapes: every layer of a forward
# meets the same ones in the same order, so an LRU cache smaller than that set misses on every layer (16 entries:
# 9.6 % slower on a 4-layer job), while a larger one only keeps kernels of past batches, whose token counts rarely
# come back. One batch's shapes, per CPU block (`cpu_block_tokens`): the attention projections and the last, shorter
# MLP piece of each MLP linear; shared by the blocks: the full MLP pieces and the patch embedding. Measured at
# 16,384 tokens in blocks of 4,096, over random image sizes: at most 21 shapes (SigLIP2 so400m), 29 (AIMv2-L), 33
# (DINOv3-L), 36 (SigLIP2 with windowed layers). `KERNEL_CACHE_ENTRIES_PER_BLOCK` entries per block of the budget
# keep ~1.8x that. Measured in docs/benchmarks.md.
KERNEL_CACHE_ENTRIES_PER_BLOCK = 16
# a floor for small budgets: the shapes every block shares (full MLP pieces, patch embedding, a pooling head's)
# do not shrink with the budget
KERNEL_CACHE_MIN_BLOCKS = 4
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def kernel_cache_capacity(max_tokens: int, block_tokens: Optional[int]) -> int:
    """Kernel cache entries for a job whose batches hold up to `max_tokens` tokens and whose model runs CPU blocks of
    `block_tokens` (None: no block schedule): `KERNEL_CACHE_ENTRIES_PER_BLOCK` per block of the budget, at least
    `KERNEL_CACHE_MIN_BLOCKS` blocks' worth (64 entries at navit-encode's defaults)."""
    if max_tokens < 1 or (block_tokens is not None and block_tokens < 1):
        raise ValueError(f"kernel_cache_capacity: max_tokens {max_tokens} and block_tokens {block_tokens} must be >= 1")
    blocks = 1 if block_tokens is None else -(-max_tokens // block_tokens)
    return KERNEL_CACHE_ENTRIES_PER_BLOCK * max(blocks, KERNEL_CACHE_MIN_BLOCKS)


def bound_kernel_caches(capacity: int) -> tuple[str, ...]:
    """Cap torch's CPU kernel caches (oneDNN primitives, ideep's LRU) at `capacity` entries (`kernel_cache_capacity`)
    through their environment variables, each only where the environment does not set it already; returns the
    variables set. oneDNN and ideep read them at the process's first oneDNN matmul, so this acts only before that
    (navit-encode calls it before loading the model)."""
    unset = tuple(name for name in KERNEL_CACHE_VARIABLES if name not in os.environ)
    for name in unset:
        os.environ[name] = str(capacity)
    return unset


def apply_cpu_job_memory_settings(allocator: str, device: str, max_tokens: int, block_tokens: Optional[int]) -> Optional[str]:
    """An encode job's memory settings for its process, before the model loads: on a CPU device the kernel caches
    bounded to the job's batches of `max_tokens` tokens and the model's `block_tokens` (`bound_kernel_caches`) and the
    `allocator` choice applied (`apply_cpu_allocator`); its line, or None."""
    if _is_cpu(device):
        bound_kernel_caches(kernel_cache_capacity(max_tokens, block_tokens))
    return apply_cpu_allocator(allocator, device)
