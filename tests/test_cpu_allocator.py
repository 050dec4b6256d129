"""tools/cpu_allocator.py: glibc malloc keeps freed memory, measured as page faults in a fresh process; where it
applies (CPU, glibc) and where not; navit-encode and navit-benchmark say when it is on."""

import platform
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


def _faults_per_round(mode: str) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_ROUND, mode], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120, check=True)
    line, faults = result.stdout.strip().splitlines()[-2:]
    return line, int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
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
