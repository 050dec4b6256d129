"""tools/cpu_allocator.py: glibc malloc keeps freed memory, read off glibc's own statistics and measured as page
faults in a fresh process; where it applies (CPU, glibc) and where not; navit-encode and navit-benchmark say when it
is on."""

import ctypes
import json
import mmap
import platform
import resource
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT

from siglip2_navit.tools import cpu_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Four touched 16 MiB tensors, freed together, each round: glibc's defaults serve them from fresh mmaps or trim the
# heap once they are free, so every round faults their pages in again; kept memory is reused without a fault.
FAULTS_PER_ROUND = textwrap.dedent(
    """
    import resource, sys, torch
    from siglip2_navit.tools.cpu_allocator import retain_freed_memory
    line = retain_freed_memory() if sys.argv[1] == "retain" else None
    def one_round():
        tensors = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(4)]
        del tensors
    one_round(); one_round()
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        one_round()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(repr(line)); print(min(faults))
    """
)


# The same rounds read off glibc's mallinfo2(3): the heap's size while the tensors are held and once they are freed,
# and the bytes glibc serves from separate mmaps. Independent of how (or whether) the kernel counts page faults.
HEAP_PER_ROUND = textwrap.dedent(
    """
    import ctypes, json, sys, torch
    from siglip2_navit.tools.cpu_allocator import retain_freed_memory
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    line = retain_freed_memory() if sys.argv[1] == "retain" else None
    def one_round():
        tensors = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(4)]
        held = mallinfo2()
        del tensors
        freed = mallinfo2()
        return held.arena >> 20, held.hblkhd >> 20, freed.arena >> 20
    one_round(); one_round()
    print(repr(line)); print(json.dumps([one_round() for _ in range(3)]))
    """
)


def _run_rounds(script: str, mode: str) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=120, check=True)
    line, rounds = result.stdout.strip().splitlines()[-2:]
    return line, rounds


def _faults_per_round(mode: str) -> tuple[str, int]:
    line, faults = _run_rounds(FAULTS_PER_ROUND, mode)
    return line, int(faults)


def _kernel_counts_page_faults() -> bool:
    """Touching 1,024 fresh 4-KiB pages counts ~1,024 minor faults on a plain Linux kernel; sandboxes such as gVisor
    report none, and transparent huge pages fault 2-MiB pages in at a time."""
    with mmap.mmap(-1, 1024 * 4096) as fresh:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for page in range(1024):
            fresh[page * 4096] = 1
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before >= 512


def _has_mallinfo2() -> bool:
    try:
        return GLIBC and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 (mallinfo2) only")
def test_retained_memory_stays_in_the_heap_and_default_settings_give_it_back():
    """Four 16 MiB tensors per round: glibc's defaults trim the freed 64 MiB off the heap (so the next round maps and
    faults it in again); once retained, the heap keeps its size when they are freed and nothing is served from a
    separate mmap."""
    line, rounds = _run_rounds(HEAP_PER_ROUND, "default")
    assert line == "None"
    for held_arena, _, freed_arena in json.loads(rounds):
        assert held_arena - freed_arena >= 48, rounds  # given back to the OS
    line, rounds = _run_rounds(HEAP_PER_ROUND, "retain")
    assert "glibc keeps freed memory" in line
    rounds = json.loads(rounds)
    assert all(freed_arena == held_arena for held_arena, _, freed_arena in rounds), rounds  # kept
    assert len({held_arena for held_arena, _, _ in rounds}) == 1, rounds  # reused: the heap no longer grows
    assert len({held_mmapped for _, held_mmapped, _ in rounds}) == 1, rounds  # no round maps its tensors separately


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
@pytest.mark.skipif(GLIBC and not _kernel_counts_page_faults(),
                    reason="this kernel does not count 4-KiB minor page faults (a sandbox such as gVisor, or "
                           "transparent huge pages); the heap test above checks the same behaviour")
def test_retained_memory_is_reused_without_page_faults():
    """64 MiB allocated and freed per round: thousands of minor faults per round with glibc's defaults (16,384 4-KiB
    pages when every page is faulted in again), none once freed memory is kept."""
    line, default_faults = _faults_per_round("default")
    assert line == "None" and default_faults > 4000
    line, retained_faults = _faults_per_round("retain")
    assert "glibc keeps freed memory" in line and "64 MiB" in line
    assert retained_faults < 100


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

    applied = []
    monkeypatch.setattr(cpu_allocator, "retain_freed_memory", lambda: applied.append(1) or "allocator: kept (test)")
    tiny = "num_hidden_layers=1,hidden_size=32,intermediate_size=64,num_attention_heads=2"
    argv = [str(REPO_ROOT / "examples" / "camera.png"), "--config-overrides", tiny, "--min-pixels", "12544", "--max-pixels", "50176",
            "--dtype", "fp32", "--device", "cpu"]
    assert encode.main(argv + ([] if choice == "retain" else ["--cpu-allocator", "default"])) == 0
    out = capsys.readouterr().out
    assert applied == ([1] if choice == "retain" else [])
    assert ("allocator: kept (test)" in out) is (choice == "retain")
