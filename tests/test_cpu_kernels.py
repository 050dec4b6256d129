"""The CPU fast paths of inference, each against a reference that does not share its code: chunked bf16 matmul
attention vs float64 softmax attention, oneDNN-fused fc1 + GELU vs the module chain, and the detection of native bf16
matmuls (`/proc/cpuinfo` mocked) that decides where the bf16 paths and `--dtype auto` apply."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_python_lines, packed_inputs, tiny_model

from siglip2_navit import navit_attention, navit_core
from siglip2_navit.modeling_siglip2_navit import Siglip2NavitMLP


GRIDS = [(1, 6, 10), (1, 2, 2), (1, 14, 8), (2, 4, 6), (1, 4, 6)]  # 60, 4, 112, 2×24, 24 tokens: groups of 1-3


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(q kᵀ · scaling) v in float64, [n, heads, L, head_dim]."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) * scaling, dim=-1) @ v


def strided_qkv(n: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, seed: int):
    """q, k, v as the packed backends hand them over: [n, heads, L, head_dim] views of [n·L, heads, head_dim] rows."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(n * length, heads, head_dim, generator=generator).to(dtype)  # noqa: E731
    return tuple(x.view(n, length, heads, head_dim).transpose(1, 2) for x in (make(), make(), make()))


@pytest.mark.parametrize("budget", [None, 3 * 37 * 4, 37 * 4 * 5, 37 * 37 * 4 * 2], ids=["default", "3-rows",
                                                                                       "5-rows", "2-pairs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_matmul_attention_is_softmax_attention(budget, dtype, monkeypatch):
    """Every way of cutting the scores into chunks (whole (sequence, head) pairs, or query rows with a short last
    chunk) gives softmax attention; bf16 within bf16 rounding."""
    if budget is not None:
        monkeypatch.setattr(navit_attention, "_CPU_ATTENTION_CHUNK_BYTES", budget // (2 if dtype == torch.bfloat16 else 1))
    q, k, v = strided_qkv(n=3, heads=4, length=37, head_dim=8, dtype=dtype, seed=1)
    scaling = 8**-0.5 * 1.7  # not the default scale: the scale must be applied, not assumed
    out = navit_attention.chunked_matmul_attention(q, k, v, scaling)
    want = reference_attention(q, k, v, scaling)
    assert out.shape == q.shape and out.dtype == dtype
    # fp32: float rounding; bf16: a few bf16 ulps of the largest output (probabilities and outputs are rounded to bf16)
    tolerance = (1e-6 if dtype == torch.float32 else 2**-6) * want.abs().max()
    assert (out.double() - want).abs().max() <= tolerance


def _spy(monkeypatch) -> list:
    calls = []
    real = navit_attention.chunked_matmul_attention

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(navit_attention, "chunked_matmul_attention", spy)
    return calls


@pytest.mark.parametrize("has_bf16, has_amx", [(True, False), (False, False), (True, True)],
                         ids=["avx512-bf16", "no-bf16", "amx"])
def test_sdpa_backend_uses_chunked_matmuls_for_cpu_bf16_inference_only(has_bf16, has_amx, monkeypatch):
    """bf16 inference on a CPU with native bf16 matmuls but no AMX runs the chunked matmul path (one call per group
    of equal lengths), matching fp32 to min per-token cosine ≥ 0.999; without the hardware, with AMX (torch's fused
    kernel is faster there), with autograd, or in fp32 it is SDPA."""
    monkeypatch.setattr(navit_attention, "cpu_has_bf16_matmul", lambda: has_bf16)
    monkeypatch.setattr(navit_attention, "cpu_has_amx_bf16", lambda: has_amx)
    calls = _spy(monkeypatch)
    model = tiny_model(num_hidden_layers=3)
    half = copy.deepcopy(model).to(torch.bfloat16)
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    with torch.inference_mode():
        fp32 = model(pixel_values, grid).last_hidden_state
        assert not calls  # fp32 keeps SDPA: torch's fused kernel beats explicit fp32 matmuls
        bf16 = half(pixel_values, grid).last_hidden_state.float()
    lengths = {h * w for _, h, w in GRIDS}
    assert len(calls) == (3 * len(lengths) if has_bf16 and not has_amx else 0)
    assert F.cosine_similarity(bf16, fp32, dim=-1).min() >= 0.999
    calls.clear()
    out = half(pixel_values, grid).last_hidden_state
    assert out.requires_grad and not calls  # autograd: SDPA (the chunked path writes into reused buffers)


def test_chunked_and_sdpa_paths_agree_on_a_packed_bf16_batch(monkeypatch):
    """The same bf16 model and batch through both CPU paths of the sdpa backend: equal up to bf16 rounding."""
    model = tiny_model(num_hidden_layers=2).to(torch.bfloat16)
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    outputs = {}
    monkeypatch.setattr(navit_attention, "cpu_has_amx_bf16", lambda: False)
    for has_bf16 in (True, False):
        monkeypatch.setattr(navit_attention, "cpu_has_bf16_matmul", lambda has_bf16=has_bf16: has_bf16)
        with torch.inference_mode():
            outputs[has_bf16] = model(pixel_values, grid).last_hidden_state.float()
    assert F.cosine_similarity(outputs[True], outputs[False], dim=-1).min() >= 0.999


# ---------------------------------------------------------------------------------------------------------------------
# torch's fused CPU attention on lengths padded to a multiple of 64 (half precision inference)
# ---------------------------------------------------------------------------------------------------------------------


def _sdpa_lengths(monkeypatch) -> list:
    """The sequence lengths (query, key) each `F.scaled_dot_product_attention` call gets, with whether it had a mask."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[-2], k.shape[-2], attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(navit_attention.F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("length", [1, 37, 64, 65, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_padded_cpu_sdpa_is_softmax_attention(length, dtype, monkeypatch):
    """Padded keys masked out and padded query rows dropped: softmax attention over the real length (fp32 to 1e-5,
    half precision within its rounding), computed on a multiple of 64 rows."""
    calls = _sdpa_lengths(monkeypatch)
    q, k, v = strided_qkv(n=2, heads=3, length=length, head_dim=8, dtype=dtype, seed=length)
    out = navit_attention.padded_cpu_sdpa(q, k, v, 0.3)
    assert out.shape == q.shape and out.dtype == dtype
    expected = reference_attention(q, k, v, 0.3)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    padded = -(-length // 64) * 64
    assert calls == [(padded, padded, padded != length)]


@pytest.mark.parametrize("dtype, grad", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)],
                         ids=["bf16-inference", "fp32", "bf16-autograd"])
def test_sdpa_backend_pads_lengths_in_cpu_half_precision_inference_only(dtype, grad, monkeypatch):
    """On an AMX CPU (where bf16 keeps torch's fused kernel) every bf16 inference call gets a multiple of 64 rows;
    fp32 and autograd get the real lengths; the packed output matches fp32 either way."""
    monkeypatch.setattr(navit_attention, "cpu_has_bf16_matmul", lambda: True)
    monkeypatch.setattr(navit_attention, "cpu_has_amx_bf16", lambda: True)
    model = tiny_model(num_hidden_layers=2)
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    with torch.inference_mode():
        fp32 = model(pixel_values, grid).last_hidden_state
    calls = _sdpa_lengths(monkeypatch)
    with torch.inference_mode(not grad):
        out = model.to(dtype)(pixel_values, grid).last_hidden_state.float()
    lengths = sorted({h * w for _, h, w in GRIDS})
    seen = sorted({q for q, _, _ in calls})
    if dtype == torch.bfloat16 and not grad:
        assert seen == sorted({-(-length // 64) * 64 for length in lengths}) and all(q % 64 == 0 for q in seen)
    else:
        assert seen == lengths and not any(masked for _, _, masked in calls)
    assert F.cosine_similarity(out, fp32, dim=-1).min() >= (0.999 if dtype == torch.bfloat16 else 0.99999)


SDPA_GROWTH = """
import random, sys, torch
import torch.nn.functional as F
from siglip2_navit.navit_attention import padded_cpu_sdpa
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
attend = padded_cpu_sdpa if sys.argv[1] == "padded" else (lambda q, k, v, s: F.scaled_dot_product_attention(q, k, v, scale=s))
random.seed(0)
q = torch.randn(1, 2, 1600, 72, dtype=torch.bfloat16)
with torch.inference_mode():
    for length in (64, 128, 1000):
        attend(q[:, :, :length], q[:, :, :length], q[:, :, :length], 0.1)
    before = rss_mib()
    for _ in range(60):
        length = random.randint(100, 1600)
        attend(q[:, :, :length], q[:, :, :length], q[:, :, :length], 0.1)
print(rss_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_padded_lengths_keep_the_fused_cpu_kernels_from_piling_up():
    """60 random bf16 sequence lengths: where torch compiles and keeps fused-attention kernels per length (this
    project's AMX machines: ~100 MiB for these 60), padding keeps the process within a third of that growth."""
    def growth(mode: str) -> int:
        return int(fresh_python_lines(SDPA_GROWTH, mode)[-1])

    plain = growth("plain")
    if plain < 40:
        pytest.skip(f"torch's fused CPU attention grew this process by {plain} MiB over 60 lengths: it keeps no "
                    "per-length kernels here, so there is nothing to compare")
    assert growth("padded") < plain / 3


# ---------------------------------------------------------------------------------------------------------------------
# fc1 + GELU as one oneDNN GEMM
# ---------------------------------------------------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(navit_core._onednn_linear() is None, reason="this torch build has no oneDNN linear")


def _mlp(hidden_act: str, seed: int = 0) -> Siglip2NavitMLP:
    torch.manual_seed(seed)
    config = tiny_model().config
    config.hidden_act = hidden_act
    mlp = Siglip2NavitMLP(config).eval()
    with torch.no_grad():
        for param in mlp.parameters():
            param.normal_(0, 0.5)
    return mlp


@needs_onednn
@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu"])
def test_fused_fc1_gelu_equals_the_module_chain(hidden_act):
    """CPU inference fuses GELU into fc1's GEMM: the MLP's output equals fc2(act(fc1(x))) computed in float64."""
    mlp = _mlp(hidden_act)
    x = torch.randn(37, mlp.fc1.in_features)
    with torch.inference_mode():
        assert navit_core.fused_linear(mlp.fc1, x, hidden_act) is not None  # the fused path is the one under test
        out = mlp(x)
    approximate = "tanh" if hidden_act == "gelu_pytorch_tanh" else "none"
    d = mlp.double()
    want = d.fc2(F.gelu(d.fc1(x.double()), approximate=approximate))
    assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()


@needs_onednn
def test_fused_linear_applies_only_where_nothing_could_observe_or_differentiate_it(monkeypatch):
    mlp = _mlp("gelu_pytorch_tanh")
    x = torch.randn(5, mlp.fc1.in_features)
    assert navit_core.fused_linear(mlp.fc1, x, "gelu_pytorch_tanh") is None  # autograd: the weights need gradients
    with torch.inference_mode():
        assert navit_core.fused_linear(mlp.fc1, x, "quick_gelu") is None  # no oneDNN post-op
        assert navit_core.fused_linear(mlp.fc1, x.double(), None) is None  # not fp32 / bf16
        monkeypatch.setattr(navit_core, "cpu_has_bf16_matmul", lambda: False)
        assert navit_core.fused_linear(mlp.bfloat16().fc1, x.bfloat16(), None) is None  # bf16 without the hardware
        mlp.float()
        seen = []
        mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        assert navit_core.fused_linear(mlp.fc1, x, "gelu_pytorch_tanh") is None  # a hook must see fc1's output
        mlp(x)
    assert seen == [(5, mlp.fc1.out_features)]


# ---------------------------------------------------------------------------------------------------------------------
# Native bf16 matmuls: /proc/cpuinfo, and the dtype that runs fastest
# ---------------------------------------------------------------------------------------------------------------------

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra} xsave

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra} xsave
"""


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the detection at a fake /proc/cpuinfo with the given extra flags (None: no such file)."""

    def write(extra):
        path = tmp_path / "cpuinfo"
        if extra is not None:
            path.write_text(CPUINFO.format(extra=extra))
        monkeypatch.setattr(navit_attention, "CPUINFO_PATH", str(path))
        clear()

    def clear():
        navit_attention.cpu_has_bf16_matmul.cache_clear()
        navit_attention.cpu_has_amx_bf16.cache_clear()
        navit_attention.cpu_vendor.cache_clear()

    yield write
    clear()


@pytest.mark.parametrize(
    "extra, has_bf16, has_amx",
    [("avx512_bf16", True, False), ("amx_bf16 amx_tile", True, True), ("avx512_bf16 amx_bf16", True, True),
     ("avx512_vnni", False, False), ("", False, False),
     ("avx512_bf16x amx_bf16x", False, False)],  # a flag is a whole word
)
def test_native_bf16_matmuls_are_read_from_cpuinfo_flags(cpuinfo, extra, has_bf16, has_amx):
    cpuinfo(extra)
    assert navit_attention.cpu_has_bf16_matmul() is has_bf16
    assert navit_attention.cpu_has_amx_bf16() is has_amx
    assert navit_attention.preferred_dtype("cpu") == (torch.bfloat16 if has_bf16 else torch.float32)
    assert navit_attention.preferred_dtype(torch.device("cpu")) == navit_attention.preferred_dtype("cpu")


@pytest.mark.parametrize(
    "probes, has_bf16, has_amx",
    [(("_is_avx512_bf16_supported",), True, False), (("_is_amx_tile_supported",), True, True), ((), False, False)],
    ids=["avx512-bf16", "amx", "torch-without-probes"],
)
def test_without_cpuinfo_torchs_cpu_probes_decide(cpuinfo, monkeypatch, probes, has_bf16, has_amx):
    cpuinfo(None)
    fake = type("Probes", (), {probe: staticmethod(lambda: True) for probe in probes})
    monkeypatch.setattr(torch._C, "_cpu", fake, raising=False)
    assert navit_attention.cpu_has_bf16_matmul() is has_bf16
    assert navit_attention.cpu_has_amx_bf16() is has_amx


@pytest.mark.parametrize("extra, vendor", [("", "AuthenticAMD"), (None, "")])  # None: no /proc/cpuinfo (macOS, Windows)
def test_cpu_vendor_is_read_from_cpuinfo(cpuinfo, extra, vendor):
    cpuinfo(extra)
    assert navit_attention.cpu_vendor() == vendor


def test_cpu_flags_parses_x86_and_arm_listings():
    assert "avx512_bf16" in navit_attention.cpu_flags(CPUINFO.format(extra="avx512_bf16"))
    assert navit_attention.cpu_flags("processor : 0\nFeatures : fp asimd bf16 i8mm\n") == {"fp", "asimd", "bf16", "i8mm"}
    assert navit_attention.cpu_flags("") == frozenset()


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_preferred_dtype_on_cuda_follows_the_gpus_bf16_support(bf16_supported, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert navit_attention.preferred_dtype("cuda") == (torch.bfloat16 if bf16_supported else torch.float32)
    assert navit_attention.preferred_dtype("meta") == torch.float32


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel", ""])
def test_inference_with_fused_linears_equals_the_autograd_forward(vendor, dtype, monkeypatch):
    """CPU inference runs fc1 + GELU as one oneDNN GEMM, and every bias-only projection (q, k, v, out, fc2) too except
    in fp32 on Intel CPUs (torch's F.linear is faster there): either way the output equals the autograd forward, which
    runs the plain modules over all tokens."""
    monkeypatch.setattr(navit_core, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(navit_core, "cpu_has_bf16_matmul", lambda: True)  # bf16 takes oneDNN on any CPU here
    calls = []
    kernel = navit_core._onednn_linear()
    monkeypatch.setattr(navit_core, "_onednn_linear", lambda: lambda *args: calls.append(args[3]) or kernel(*args))
    model = tiny_model(num_hidden_layers=2).to(dtype)
    pixel_values, grid = packed_inputs(model.config, GRIDS)
    with torch.inference_mode():
        fast = model(pixel_values, grid).last_hidden_state
    bias_only = 0 if (vendor, dtype) == ("GenuineIntel", torch.float32) else 5  # per layer: q, k, v, out, fc2
    assert sorted(calls) == sorted(["none"] * bias_only * 2 + ["gelu"] * 2)
    calls.clear()
    reference = model(pixel_values, grid).last_hidden_state
    assert not calls and reference.requires_grad
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast, reference.detach(), atol=tolerance, rtol=tolerance)
