"""tools/cpu_allocator.py: glibc malloc keeps freed memory, read off glibc's own statistics and measured as page
faults in a fresh process; where it applies (CPU, glibc) and where not; navit-encode and navit-benchmark say when it
is on."""

import ctypes
import json
import os
import platform
import random
import textwrap

import pytest
import torch
from conftest import REPO_ROOT, fresh_python_lines, packed_inputs, record_blocked_calls
from test_family_contract import FAMILIES, build
from torch.utils._python_dispatch import TorchDispatchMode

from siglip2_navit.tools import cpu_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Each round touches and frees a 48 MiB tensor, then a 40 MiB one: the second is measured. Above 32 MiB glibc's
# defaults always serve a block from its own mmap and unmap it on free (its dynamic threshold never rises past 32 MiB),
# so every round faults the 40 MiB (10,240 pages) in again; below that, blocks are kept or trimmed depending on what
# else sits on the heap, which varies from one process to the next (16 MiB blocks: kept under some hash seeds, trimmed
# under others). Retained, the 48 MiB stay in the heap and the 40 MiB fit into them (a same-size block need not: torch
# asks for aligned memory, which glibc pads). Per round, for the 40 MiB: the heap's size before, while held and once
# freed, the MiB glibc serves from separate mmaps while held and once freed (glibc's mallinfo2; None before glibc
# 2.33), and the minor page faults.
ROUNDS = textwrap.dedent(
    """
    import ctypes, json, resource, sys, torch
    from siglip2_navit.tools.cpu_allocator import retain_freed_memory
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    mallinfo2 = getattr(ctypes.CDLL("libc.so.6"), "mallinfo2", None)
    if mallinfo2 is not None:
        mallinfo2.restype = MallInfo2
    def heap():
        info = mallinfo2() if mallinfo2 is not None else None
        return (None, None) if info is None else (info.arena >> 20, info.hblkhd >> 20)
    line = retain_freed_memory() if sys.argv[1] == "retain" else None
    def touched(mib):
        return torch.empty(mib * 2**18).fill_(1.0)
    def one_round():
        first = touched(48)
        del first
        before = heap()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensor = touched(40)
        held = heap()
        del tensor
        freed = heap()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return dict(arena_before=before[0], held_arena=held[0], freed_arena=freed[0], held_mmapped=held[1],
                    freed_mmapped=freed[1], faults=faults)
    one_round()
    print(repr(line)); print(json.dumps([one_round() for _ in range(3)]))
    """
)


def _rounds(mode: str) -> tuple[str, list[dict]]:
    line, rounds = fresh_python_lines(ROUNDS, mode, timeout=120)[-2:]
    return line, json.loads(rounds)


def _has_mallinfo2() -> bool:
    try:
        return GLIBC and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 (mallinfo2) only")
def test_retained_memory_stays_in_the_heap_and_default_settings_unmap_it():
    """glibc's own statistics: with its defaults the 40 MiB block is mapped for each round and unmapped when freed;
    retained, it is served from memory the heap kept (the heap does not grow for it) and stays there when freed."""
    line, rounds = _rounds("default")
    assert line == "None"
    assert all(r["held_mmapped"] - r["freed_mmapped"] >= 40 for r in rounds), rounds
    line, rounds = _rounds("retain")
    assert "glibc keeps freed memory" in line and "64 MiB" in line
    assert all(r["held_mmapped"] == r["freed_mmapped"] for r in rounds), rounds  # not a separate mmap
    assert all(r["held_arena"] == r["arena_before"] for r in rounds), rounds  # reused: the heap did not grow
    assert all(r["freed_arena"] == r["held_arena"] for r in rounds), rounds  # kept when freed


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults():
    """The same rounds counted in minor page faults: 10,240 per round with glibc's defaults (every 4-KiB page of the
    40 MiB faulted in again), none once freed memory is kept. Skipped where the defaults show none to remove: a
    kernel that counts no minor faults (some sandboxes) or faults memory in as 2-MiB pages (transparent huge pages);
    the heap test above checks the same behaviour there."""
    line, rounds = _rounds("default")
    default_faults = min(r["faults"] for r in rounds)
    if default_faults <= 4000:
        pytest.skip(f"{default_faults} minor page faults per round with glibc's defaults: this kernel does not count "
                    "4-KiB faults of fresh mappings (a sandbox, or transparent huge pages), so there is nothing to "
                    "compare")
    line, rounds = _rounds("retain")
    assert "glibc keeps freed memory" in line
    assert max(r["faults"] for r in rounds) < 100, rounds


def test_nothing_is_set_outside_glibc_or_off_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_allocator.ctypes, "CDLL", lambda *a: calls.append(a))
    monkeypatch.setattr(cpu_allocator.platform, "libc_ver", lambda: ("", ""))  # e.g. musl
    assert cpu_allocator.retain_freed_memory() is None
    monkeypatch.setattr(cpu_allocator.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(cpu_allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert cpu_allocator.retain_freed_memory() is None
    assert calls == []  # libc never opened
    assert cpu_allocator.apply_cpu_allocator("retain", "cuda:0") is None
    assert cpu_allocator.apply_cpu_allocator("default", "cpu") is None
    with pytest.raises(ValueError, match=r"cpu allocator 'keep': expected one of \('retain', 'default'\)"):
        cpu_allocator.apply_cpu_allocator("keep", "cpu")


def test_the_32_mib_threshold_is_the_fallback_and_a_refusal_sets_nothing_it_reports(monkeypatch):
    """A glibc that refuses a 64 MiB threshold gets 32 MiB (the line says so); one that refuses both, or the trim
    setting, is reported as not applied."""
    monkeypatch.setattr(cpu_allocator.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_allocator.platform, "libc_ver", lambda: ("glibc", "2.17"))

    def fake_libc(accepted):
        class Mallopt:
            def __call__(self, param, value):
                self.calls.append((param, value))
                return int((param, value) in accepted)

        mallopt = Mallopt()
        mallopt.calls = []
        return type("Libc", (), {"mallopt": mallopt})(), mallopt

    trim = (cpu_allocator.M_TRIM_THRESHOLD, cpu_allocator.NEVER_TRIM_BYTES)
    libc, mallopt = fake_libc({(cpu_allocator.M_MMAP_THRESHOLD, 32 * 2**20), trim})
    monkeypatch.setattr(cpu_allocator.ctypes, "CDLL", lambda *a: libc)
    assert "heap blocks up to 32 MiB" in cpu_allocator.retain_freed_memory()
    assert mallopt.calls == [(cpu_allocator.M_MMAP_THRESHOLD, 64 * 2**20), (cpu_allocator.M_MMAP_THRESHOLD, 32 * 2**20),
                             trim]
    libc, _ = fake_libc({trim})
    monkeypatch.setattr(cpu_allocator.ctypes, "CDLL", lambda *a: libc)
    assert cpu_allocator.retain_freed_memory() is None
    libc, _ = fake_libc({(cpu_allocator.M_MMAP_THRESHOLD, 64 * 2**20)})
    monkeypatch.setattr(cpu_allocator.ctypes, "CDLL", lambda *a: libc)
    assert cpu_allocator.retain_freed_memory() is None


@pytest.mark.parametrize("choice", ["retain", "default"])
def test_navit_encode_sets_it_on_cpu_by_default_and_says_so(choice, monkeypatch, tmp_path, capsys):
    """navit-encode applies the choice for its CPU device before loading the model, and its summary has the line
    exactly when it was set."""
    from siglip2_navit.tools import encode

    applied, bounded = [], []
    monkeypatch.setattr(cpu_allocator, "retain_freed_memory", lambda: applied.append(1) or "allocator: kept (test)")
    monkeypatch.setattr(cpu_allocator, "bound_kernel_caches", lambda capacity: bounded.append(capacity) or ())
    tiny = "num_hidden_layers=1,hidden_size=32,intermediate_size=64,num_attention_heads=2,cpu_block_tokens=1000"
    argv = [str(REPO_ROOT / "examples" / "camera.png"), "--config-overrides", tiny, "--min-pixels", "12544", "--max-pixels", "50176",
            "--dtype", "fp32", "--device", "cpu", "--max-tokens", "9000"]
    assert encode.main(argv + ([] if choice == "retain" else ["--cpu-allocator", "default"])) == 0
    out = capsys.readouterr().out
    assert applied == ([1] if choice == "retain" else [])
    # kernel caches are bounded on CPU whichever allocator, sized by the job's budget and the model's CPU blocks
    assert bounded == [cpu_allocator.kernel_cache_capacity(9000, 1000)] == [16 * 9]
    assert ("allocator: kept (test)" in out) is (choice == "retain")


def test_kernel_caches_are_bounded_where_the_environment_does_not_say(monkeypatch):
    """Both variables set to the capacity when unset; a value the user set is kept."""
    for name in cpu_allocator.KERNEL_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cpu_allocator.bound_kernel_caches(64) == cpu_allocator.KERNEL_CACHE_VARIABLES
    assert all(os.environ[name] == "64" for name in cpu_allocator.KERNEL_CACHE_VARIABLES)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    monkeypatch.delenv("LRU_CACHE_CAPACITY")
    assert cpu_allocator.bound_kernel_caches(32) == ("LRU_CACHE_CAPACITY",)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7" and os.environ["LRU_CACHE_CAPACITY"] == "32"


def test_kernel_cache_capacity_follows_the_budget_in_cpu_blocks():
    """16 entries per CPU block of a batch's token budget, at least 4 blocks' worth; nonsense refused."""
    assert cpu_allocator.kernel_cache_capacity(16384, 4096) == 64  # navit-encode's default budget, the configs' blocks
    assert cpu_allocator.kernel_cache_capacity(16385, 4096) == 80
    assert cpu_allocator.kernel_cache_capacity(65536, 4096) == 256
    assert cpu_allocator.kernel_cache_capacity(2048, 4096) == cpu_allocator.kernel_cache_capacity(2048, None) == 64
    for budget, block in ((0, 4096), (16384, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            cpu_allocator.kernel_cache_capacity(budget, block)


class GemmShapes(TorchDispatchMode):
    """The distinct GEMMs dispatched while active, keyed as torch's CPU kernel caches key them: the op, its operands'
    shapes and its post-op."""

    OPS = {"mm", "addmm", "bmm", "baddbmm", "linear", "_linear_pointwise"}

    def __init__(self):
        super().__init__()
        self.keys: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.OPS:
            self.keys.add((func.__name__, *(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args
                                            if not isinstance(a, list))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["siglip2", "siglip2-windowed", "aimv2", "dinov3"])
def test_one_batch_of_layer_gemms_fits_the_bounded_kernel_caches_with_margin(family, monkeypatch):
    """Every layer of a forward meets the same GEMM shapes in the same order, so a bounded LRU cache must hold all of
    them or it misses on every layer. At the proportions of navit-encode's defaults (a budget of 4 CPU blocks, images
    of up to a block, MLP pieces of half a block), the encoder layers' distinct GEMMs over random batches stay within
    2/3 of `kernel_cache_capacity` (here 15-29 against 64; so400m widths, whole forward: 21-36)."""
    from siglip2_navit import navit_core
    from siglip2_navit.navit_batching import pack_by_token_budget

    block, budget = 1024, 4096
    model = build(family, cpu_block_tokens=block)
    config, encoder = model.config, FAMILIES[family].encoder(model)
    monkeypatch.setattr(navit_core, "_MLP_PIECE_BYTES", block // 2 * encoder.layers[0].mlp_width * 4)  # fp32 rows
    blocked = record_blocked_calls(monkeypatch, type(encoder.layers[0]))
    recorder, run_encoder = GemmShapes(), encoder.forward

    def recorded(*args, **kwargs):
        with recorder:
            return run_encoder(*args, **kwargs)

    monkeypatch.setattr(encoder, "forward", recorded)  # not a hook: hooks would turn the block schedule off
    side = 2 * config.hidden_stride  # image sides from 4 to 32 patches: up to 1,024 patches, one block
    rng = random.Random(0)
    grids = [(1, side * rng.randint(1, 32 // side), side * rng.randint(1, 32 // side)) for _ in range(200)]
    batches = pack_by_token_budget([h * w for _, h, w in grids], budget)
    largest = 0
    for indices in batches[:8]:
        recorder.keys.clear()
        pixel_values, grid_thws = packed_inputs(config, [grids[i] for i in indices])
        with torch.inference_mode():
            model(pixel_values, grid_thws)
        largest = max(largest, len(recorder.keys))
    assert max(len(sizes) for sizes in blocked) >= 4  # the block schedule ran, over several blocks
    assert 10 <= largest <= cpu_allocator.kernel_cache_capacity(budget, block) * 2 / 3, largest


# 150 oneDNN GEMMs with as many token counts (fp32, fc1 + GELU fused as navit-encode runs it), after the caches were
# bounded at 16 entries or left at torch's defaults: the process's growth in MiB.
KERNEL_CACHE_GROWTH = textwrap.dedent(
    """
    import random, sys, torch
    from siglip2_navit.tools.cpu_allocator import bound_kernel_caches
    if sys.argv[1] == "bounded":
        bound_kernel_caches(16)
    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
    weight, bias, rows = torch.randn(1024, 512), torch.randn(1024), torch.randn(2000, 512)
    linear = torch.ops.mkldnn._linear_pointwise.default
    random.seed(0)
    with torch.inference_mode():
        for tokens in (100, 200, 300):
            linear(rows[:tokens], weight, bias, "gelu", [], "tanh")
        before = rss_mib()
        for tokens in random.sample(range(100, 2000), 150):
            linear(rows[:tokens], weight, bias, "gelu", [], "tanh")
    print(rss_mib() - before)
    """
)


@pytest.mark.skipif(not platform.system() == "Linux" or not torch.backends.mkldnn.is_available(),
                    reason="reads /proc/self/statm; needs torch's oneDNN")
def test_bounded_kernel_caches_stop_the_growth_over_many_token_counts(monkeypatch):
    """With torch's defaults every new token count keeps its compiled GEMM; bounded, most of that growth is gone
    (both caches must be bounded: either alone keeps ~95 % of it)."""
    for name in cpu_allocator.KERNEL_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)  # the subprocesses inherit the test's environment

    def growth(mode: str) -> int:
        return int(fresh_python_lines(KERNEL_CACHE_GROWTH, mode)[-1])

    default = growth("default")
    if default < 30:
        pytest.skip(f"torch's defaults grew this process by {default} MiB over 150 token counts: nothing to bound")
    assert growth("bounded") < 0.6 * default  # measured here: 153 MiB with the defaults, 59-70 bounded
