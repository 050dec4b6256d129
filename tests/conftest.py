"""Shared fixtures: tiny configs, packed random inputs, and a Hub-like model folder built in a temp dir."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
# The remote code every converted folder ships (written out here, not taken from the package: tests check the
# package's own list against it), and what a family adds.
SHARED_CODE_FILES = (
    "navit_layout.py",
    "navit_attention.py",
    "navit_core.py",
    "navit_image_utils.py",
    "navit_batching.py",
    "image_processing_siglip2_navit.py",
    "pipeline_navit.py",
)


def family_code_files(family: str) -> tuple:
    """The remote code of a converted folder of `family` ("siglip2", "aimv2", "dinov3")."""
    return (f"configuration_{family}_navit.py", f"modeling_{family}_navit.py", *SHARED_CODE_FILES)


MODEL_FILES = family_code_files("siglip2")


SIGLIP2_TINY = dict(  # a few-thousand-parameter SigLIP2: same code paths as so400m, milliseconds per forward
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=2,
    image_size=16,
    hidden_stride=2,
    window_size=12,  # 12 px // 2 // 2 = 3 blocks per window side
)


def fresh_python_lines(script: str, *args: str, timeout: int = 300) -> list[str]:
    """The output lines of `python -c script args...` in a fresh process, run from the repository root (for what
    only a new process shows: allocator settings, memory growth, kernel caches)."""
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=timeout, check=True)
    return result.stdout.strip().splitlines()


def tiny_config(**overrides):
    """`SIGLIP2_TINY` with `overrides`."""
    from siglip2_navit.configuration_siglip2_navit import Siglip2NavitConfig

    return Siglip2NavitConfig(**{**SIGLIP2_TINY, **overrides})


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    from siglip2_navit.modeling_siglip2_navit import Siglip2NavitModel

    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    model = Siglip2NavitModel(config).eval()
    # random (not init-default) biases and norms so that every parameter matters in comparisons
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def enable_checkpointing(model, use_reentrant=False):
    """transformers 5.x names it activation_checkpointing_enable; 4.x gradient_checkpointing_enable."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def packed_inputs(config, grids, seed: int = 0):
    """Random pixel rows for `grids` [(t, h, w), ...] and the grid tensor."""
    generator = torch.Generator().manual_seed(seed)
    width = config.num_channels * config.temporal_patch_size * config.patch_size**2
    total = sum(t * h * w for t, h, w in grids)
    return torch.randn(total, width, generator=generator), torch.tensor(grids, dtype=torch.long)


def cpu_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """CPU stand-in for flash_attn_varlen_func: plain softmax attention inside each [cu[i], cu[i+1]) range."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and not causal and dropout_p == 0.0
    bounds = cu_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    out = torch.empty_like(q)
    for a, b in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) * softmax_scale
        out[a:b] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v[a:b])
    return out


# Batches of every shape the planner distinguishes: image counts, lengths appearing in one run or in several (regroup),
# one window per frame (window count == frame count), video frames (t = 2), a single image.
NEW_BATCHES = [
    [(1, 6, 8), (1, 2, 4)],
    [(1, 2, 6), (1, 6, 4), (1, 2, 2), (1, 4, 4)],
    [(1, 4, 4)] * 5,
    [(2, 4, 6), (1, 8, 8), (1, 4, 6)],
    [(1, 12, 10)],
    [(1, 2, 2), (1, 4, 4), (1, 2, 2), (1, 10, 2), (1, 4, 4), (1, 2, 2)],
]


def record_blocked_calls(monkeypatch, layer_class) -> list:
    """Record every `forward_blocked` call (a layer's block schedule) with the sizes of its blocks."""
    calls, original = [], layer_class.forward_blocked

    def spy(self, hidden_states, blocks, out):
        calls.append([block.end - block.start for block, _ in blocks])
        return original(self, hidden_states, blocks, out)

    monkeypatch.setattr(layer_class, "forward_blocked", spy)
    return calls


class GraphCounter:
    """A torch.compile backend that counts the graphs it is handed and runs them as traced (no codegen)."""

    def __init__(self):
        self.graphs = 0
        self.code = ""

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        self.code += graph_module.code
        return graph_module.forward


def write_hub_folder(model, folder: Path) -> Path:
    """save_pretrained + the remote-code .py files (and processor configs if present), as a Hub user gets it."""
    model.save_pretrained(folder)
    for name in MODEL_FILES + ("preprocessor_config.json", "processor_config.json"):
        if (REPO_ROOT / name).exists():
            shutil.copy(REPO_ROOT / name, folder / name)
    return folder


@pytest.fixture
def hub_folder(tmp_path):
    def make(model):
        return write_hub_folder(model, tmp_path / "model")

    return make


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Tiny models are dispatch-bound: one thread is faster and keeps parallel test runs from oversubscribing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
