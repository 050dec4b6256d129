# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The family contract, checked for every family (SigLIP2 in three layer/pooling variants, AIMv2, DINOv3).

Statically: a family file overrides only the hooks `PackedPreTrainedModel`'s docstring lists (and every listed hook
exists on the core), imports the core only through `navit_core.__all__`, and defines no module-level name of the
core's modules. At run time: the attention backends agree (eager, sdpa, flash-attn mocked on CPU, functions registered
with transformers' AttentionInterface), runtime switching, gradient checkpointing, torch.compile without recompiles,
the CPU block schedule, `keep_indices`, and bad inputs refused before any compute.

References are the eager backend, the un-checkpointed / un-compiled model and the one-op-over-all-tokens path; every
parameter is randomised (`randomize_`), grids are drawn at random (non-square, several images and a video per packed
call). Agreement with transformers / Ovis is in each family's own test file.
"""

import ast
import importlib.util
import inspect
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import (
    NEW_BATCHES,
    SIGLIP2_TINY,
    GraphCounter,
    cpu_flash_varlen,
    enable_checkpointing,
    packed_inputs,
    record_blocked_calls,
)
from test_dinov3 import BASE as DINOV3_BASE
from test_dinov3 import randomize_
from transformers import AutoModel

from siglip2_navit import navit_attention, navit_core, navit_layout
from siglip2_navit.configuration_aimv2_navit import Aimv2NavitConfig
from siglip2_navit.configuration_dinov3_navit import Dinov3NavitConfig
from siglip2_navit.configuration_siglip2_navit import Siglip2NavitConfig
from siglip2_navit.modeling_aimv2_navit import Aimv2NavitModel
from siglip2_navit.modeling_dinov3_navit import Dinov3NavitModel
from siglip2_navit.modeling_siglip2_navit import Siglip2NavitModel
from siglip2_navit.tools import families


CORE_DIR = Path(navit_core.__file__).parent
FAMILY_FILES = {
    "siglip2": ("modeling_siglip2_navit.py", "configuration_siglip2_navit.py"),
    "aimv2": ("modeling_aimv2_navit.py", "configuration_aimv2_navit.py"),
    "dinov3": ("modeling_dinov3_navit.py", "configuration_dinov3_navit.py"),
}
CORE_CLASSES = (
    navit_core.PackedPreTrainedModel,
    navit_core.PackedSelfAttention,
    navit_core.PackedEncoderLayer,
    navit_core.PackedEncoder,
    navit_core.PackedPatchEmbedding,
)


# ----------------------------------------------------------------------------------------------------------------------
# The static contract
# ----------------------------------------------------------------------------------------------------------------------


def contract_hooks() -> set:
    """(core class, name) of every hook the family contract (PackedPreTrainedModel's docstring) lists."""
    text = inspect.getdoc(navit_core.PackedPreTrainedModel)
    return set(re.findall(r"`(Packed\w+)\.(\w+)", text))


def family_overrides(path: Path) -> set:
    """(core class, name) of everything a family file's classes define that one of the core classes they derive from
    already has: methods and class attributes in the class body, attributes set on `self` in `__init__`."""
    module = sys.modules[f"siglip2_navit.{path.stem}"]
    overrides = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, node.name)
        bases = [base for base in CORE_CLASSES if issubclass(cls, base)]
        if not bases:
            continue
        names = set()
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(item.name)
                if item.name == "__init__":
                    names |= {
                        target.attr
                        for statement in ast.walk(item)
                        if isinstance(statement, ast.Assign)
                        for target in statement.targets
                        if isinstance(target, ast.Attribute) and getattr(target.value, "id", None) == "self"
                    }
            elif isinstance(item, ast.Assign):
                names |= {target.id for target in item.targets if isinstance(target, ast.Name)}
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names.add(item.target.id)
        names.discard("__init__")
        for name in names:
            owner = next((base for base in bases if name in dir(base)), None)
            if owner is not None:
                overrides.add((owner.__name__, name))
    return overrides


def test_the_contract_lists_only_hooks_the_core_has():
    hooks = contract_hooks()
    assert len(hooks) >= 17, sorted(hooks)
    for owner, name in hooks:
        assert hasattr(getattr(navit_core, owner), name), f"the contract lists {owner}.{name}, which the core lacks"


@pytest.mark.parametrize("family", list(FAMILY_FILES))
def test_a_family_overrides_only_what_the_contract_lists(family):
    overrides = family_overrides(CORE_DIR / FAMILY_FILES[family][0])
    assert ("PackedPreTrainedModel", "encode") in overrides  # the parser sees the family's classes
    assert overrides <= contract_hooks(), f"not in the family contract: {sorted(overrides - contract_hooks())}"


def test_the_override_check_catches_an_unlisted_override(tmp_path, monkeypatch):
    """A family class that overrides a core method the contract does not list (here `plan`) is reported."""
    source = "class FakeModel(PackedPreTrainedModel):\n    def plan(self, *args):\n        pass\n"
    module = type(sys)("siglip2_navit.modeling_fake_navit")
    module.PackedPreTrainedModel = navit_core.PackedPreTrainedModel
    exec(source, module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "modeling_fake_navit.py"
    path.write_text(source)
    assert family_overrides(path) == {("PackedPreTrainedModel", "plan")}
    assert not family_overrides(path) <= contract_hooks()


@pytest.mark.parametrize("family_file", [name for files in FAMILY_FILES.values() for name in files])
def test_families_import_only_the_core_public_names(family_file):
    """A family file reaches the core through `navit_core.__all__` only (never a private name, never navit_layout /
    navit_attention directly at run time)."""
    tree = ast.parse((CORE_DIR / family_file).read_text(encoding="utf-8"))
    for node in tree.body:  # what runs at import (an `if TYPE_CHECKING:` block only names files for the loader)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and node.module.startswith("navit_"):
            assert node.module == "navit_core", f"{family_file} imports from .{node.module}"
            names = {alias.name for alias in node.names}
            assert names <= set(navit_core.__all__), f"{family_file} imports {sorted(names - set(navit_core.__all__))}"
            assert all(alias.asname is None for alias in node.names), f"{family_file} renames a core name"


@pytest.mark.parametrize("family_file", [name for files in FAMILY_FILES.values() for name in files])
def test_family_files_define_no_name_of_the_core_modules(family_file):
    """No module-level function, class or variable of a family file takes a name the core's modules define (a second
    `build_packed_layout` of another signature would shadow the core's for every reader of that file)."""
    core_names = set()
    for module in (navit_core, navit_layout, navit_attention):
        core_names |= {name for name in vars(module) if not name.startswith("__")}
    defined = set()
    for node in ast.parse((CORE_DIR / family_file).read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    defined -= {"logger", "__all__"}  # every module's own
    assert not defined & core_names, f"{family_file} redefines {sorted(defined & core_names)}"


# ----------------------------------------------------------------------------------------------------------------------
# Families at run time
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    model_class: type
    config_class: type
    config: dict
    encoder: Callable  # model -> its PackedEncoder
    headless: dict  # config fields of the same model without a pooling head
    unused_parameters: tuple = ()  # parameters a plain forward leaves without gradient


SIGLIP2_WINDOWED = dict(SIGLIP2_TINY, num_hidden_layers=3, fullatt_block_indexes=[1])  # layers 0, 2: 3×3-block windows
FAMILIES = {
    "siglip2": Family(
        Siglip2NavitModel, Siglip2NavitConfig, SIGLIP2_TINY, lambda m: m.vision_model.encoder, {"vision_use_head": False}
    ),
    "siglip2-windowed": Family(
        Siglip2NavitModel, Siglip2NavitConfig, SIGLIP2_WINDOWED, lambda m: m.vision_model.encoder,
        {"vision_use_head": False},
    ),
    "siglip2-head": Family(  # MAP head, no RoPE, two frames per patch
        Siglip2NavitModel,
        Siglip2NavitConfig,
        dict(SIGLIP2_WINDOWED, use_rope=False, vision_use_head=True, temporal_patch_size=2),
        lambda m: m.vision_model.encoder,
        {"vision_use_head": False},
    ),
    "aimv2": Family(
        Aimv2NavitModel,
        Aimv2NavitConfig,
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
             hidden_stride=2, is_native=True, qkv_bias=True, mlp_bias=True),
        lambda m: m.encoder,
        {"use_head": False},
    ),
    "dinov3": Family(
        Dinov3NavitModel, Dinov3NavitConfig, dict(DINOV3_BASE, hidden_stride=2), lambda m: m.encoder, {},
        unused_parameters=("embeddings.mask_token",),  # only `bool_masked_pos` uses it
    ),
}
NAMES = list(FAMILIES)
OUTPUT_FIELDS = ("last_hidden_state", "pooler_output", "prefix_tokens")


def build(family: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A tiny model of `family`, every parameter random, in eval mode, on `attn_implementation` (set on the config as
    transformers would, without its flash-attn import check)."""
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    model = randomize_(spec.model_class(spec.config_class(**{**spec.config, **overrides})), seed).eval()
    model.config._attn_implementation = attn_implementation  # read at every forward
    return model


def random_grids(seed: int, num_images: int = 4, stride: int = 2) -> list:
    """`num_images` random (t, h, w), sides multiples of `stride`, at least one video and one non-square image."""
    rng = random.Random(seed)
    while True:
        grids = [(rng.choice((1, 1, 2)), stride * rng.randint(1, 5), stride * rng.randint(1, 5)) for _ in range(num_images)]
        if any(t == 2 for t, _, _ in grids) and any(h != w for _, h, w in grids):
            return grids


def outputs_of(out) -> dict:
    """The tensor fields a family returns (`prefix_tokens`: DINOv3's)."""
    return {name: getattr(out, name) for name in OUTPUT_FIELDS if getattr(out, name, None) is not None}


def loss_of(out) -> torch.Tensor:
    """A loss every output element reaches with its own weight."""
    loss = 0.0
    for tensor in outputs_of(out).values():
        loss = loss + (tensor * torch.linspace(-1, 1, tensor.numel()).view_as(tensor)).sum() + tensor.sin().sum()
    return loss


def assert_outputs_close(actual, expected, **tolerance):
    expected_fields = outputs_of(expected)
    assert outputs_of(actual).keys() == expected_fields.keys()
    for name, tensor in expected_fields.items():
        torch.testing.assert_close(getattr(actual, name), tensor, msg=name, **tolerance)


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, atol: float, msg: str = "") -> None:
    """`actual` ≈ `expected` up to `atol` per unit of `expected`'s largest magnitude (at least 1), rtol 1e-5: the
    float32 rounding of sums taken in another order grows with the values (randomised weights reach ~20)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=1e-5, msg=msg)


def attention_module(layer) -> navit_core.PackedSelfAttention:
    return next(m for m in layer.modules() if isinstance(m, navit_core.PackedSelfAttention))


@pytest.fixture
def fake_flash(monkeypatch):
    """flash_attention_2 on CPU: the core's flash-attn entry point served by a plain per-sequence softmax."""
    monkeypatch.setitem(navit_attention._FLASH_VARLEN, "fn", cpu_flash_varlen)


def hub_folder(model, folder: Path) -> Path:
    """A Hub folder of `model`: config with auto_map, weights and the family's remote-code files."""
    model.save_pretrained(folder)
    for name in families.family_of(model.config).code_files:
        shutil.copyfile(CORE_DIR / name, folder / name)
    return folder


# -- attention backends --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NAMES)
def test_backends_agree_on_outputs_and_gradients(family, fake_flash, monkeypatch):
    """eager, sdpa, flash-attn (CPU stand-in) and two functions registered with transformers' AttentionInterface (one
    taking equal-length batches [n, heads, L, d], one flash-like on cu_seq_lens) give the outputs, the input gradient
    and every parameter's gradient of eager mode, in training."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = {"batched": 0, "varlen": 0}

    def batched_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        assert attention_mask is None and query.dim() == 4  # [n, heads, L, head_dim]
        calls["batched"] += 1
        probs = (query @ key.transpose(-1, -2) * scaling).softmax(-1)
        return (probs @ value).transpose(1, 2), None  # [n, L, heads, head_dim], as transformers' interfaces

    def flash_like_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        assert query.shape[0] == 1  # [1, heads, K, head_dim] + cu_seq_lens kwargs
        calls["varlen"] += 1
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        out = cpu_flash_varlen(
            q, k, v, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"],
            kwargs["max_length_k"], softmax_scale=scaling,
        )
        return out[None], None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "test_batched", batched_attention)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "test_flash_kernel", flash_like_attention)
    grids = random_grids(1)
    results = {}
    for backend in ("eager", "sdpa", "flash_attention_2", "test_batched", "test_flash_kernel"):
        model = build(family, backend).train()
        pixel_values, grid = packed_inputs(model.config, grids)
        pixel_values.requires_grad_(True)
        torch.manual_seed(0)  # DINOv3's training-time RoPE augmentation: the same draws for every backend
        out = model(pixel_values, grid)
        if backend == "test_flash_kernel":
            assert calls["batched"] > 0 and calls["varlen"] == model.config.num_hidden_layers
        loss_of(out).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out, pixel_values.grad.clone(), grads)
    reference, reference_input_grad, reference_grads = results.pop("eager")
    assert len(reference_grads) == len(list(model.parameters())) - len(FAMILIES[family].unused_parameters)
    for backend, (out, input_grad, grads) in results.items():
        assert_outputs_close(out, reference, atol=1e-4, rtol=0)
        torch.testing.assert_close(input_grad, reference_input_grad, atol=1e-4, rtol=1e-5, msg=backend)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():  # gradients up to a few hundred: float32 rounding of the sums
            torch.testing.assert_close(grad, reference_grads[name], atol=1e-4, rtol=1e-5, msg=f"{backend} {name}")


@pytest.mark.parametrize("family", NAMES)
def test_unknown_backend_is_refused(family):
    model = build(family)
    model.config._attn_implementation = "no_such_backend"
    with pytest.raises((ValueError, KeyError), match="no_such_backend"):
        model(*packed_inputs(model.config, random_grids(2)))


@pytest.mark.parametrize("family", NAMES)
def test_attention_maps_are_per_sequence_and_a_fast_backend_falls_back_to_eager(family):
    """`output_attentions` on sdpa runs eager for that call: the maps of the eager backend, one [heads, L, L] per
    frame (full layers; DINOv3's L counts its prefix tokens) or per window, each row a distribution."""
    model = build(family, "sdpa")
    grids = random_grids(3)
    pixel_values, grid = packed_inputs(model.config, grids)
    layout = model.plan(pixel_values, grid)
    with torch.no_grad():
        maps = model(pixel_values, grid, output_attentions=True).attentions
        model.set_attn_implementation("eager")
        eager_maps = model(pixel_values, grid, output_attentions=True).attentions
    heads, prefix = model.config.num_attention_heads, layout.num_prefix_tokens
    frame_sizes = [(heads, prefix + h * w, prefix + h * w) for t, h, w in grids for _ in range(t)]
    encoder = FAMILIES[family].encoder(model)
    assert len(maps) == len(eager_maps) == model.config.num_hidden_layers
    for layer, ours, reference in zip(encoder.layers, maps, eager_maps):
        if layer.full_attention:
            assert [tuple(m.shape) for m in ours] == frame_sizes
        else:
            assert len(ours) == layout.window.cu_seqlens_host.numel() - 1
        assert len(ours) == len(reference)
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


@pytest.mark.parametrize("family", NAMES)
def test_set_attn_implementation_switches_the_backend_at_runtime(family, tmp_path):
    """A Hub folder loaded with eager attention switches to sdpa at runtime: the remote code's attention functions are
    called on the backend of the moment, once per layer, and the outputs agree."""
    folder = hub_folder(build(family), tmp_path / family)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
    assert type(model).__name__ == FAMILIES[family].model_class.__name__
    assert model.config._attn_implementation == "eager"
    pixel_values, grid = packed_inputs(model.config, random_grids(4))
    remote_core = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".navit_core"]  # the remote-code copy
    originals = dict(remote_core.PACKED_ATTENTION_FUNCTIONS)
    calls = []

    def spy(backend):
        def attention(*args, **kwargs):
            calls.append(backend)
            return originals[backend](*args, **kwargs)

        return attention

    layers = model.config.num_hidden_layers
    try:
        remote_core.PACKED_ATTENTION_FUNCTIONS.update({name: spy(name) for name in ("sdpa", "eager")})
        with torch.no_grad():
            eager_maps = model(pixel_values, grid, output_attentions=True).attentions
            eager = model(pixel_values, grid)
            model.set_attn_implementation("sdpa")
            assert model.config._attn_implementation == "sdpa"
            sdpa = model(pixel_values, grid)
            model.set_attn_implementation("eager")
            eager_again = model(pixel_values, grid)
    finally:
        remote_core.PACKED_ATTENTION_FUNCTIONS.update(originals)
    assert calls == ["eager"] * 2 * layers + ["sdpa"] * layers + ["eager"] * layers
    assert len(eager_maps) == layers and eager_maps[0][0].shape[0] == model.config.num_attention_heads
    assert_outputs_close(sdpa, eager, atol=1e-5, rtol=1e-5)
    assert_outputs_close(eager_again, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
@pytest.mark.parametrize("family", NAMES)
def test_flash_attention_without_flash_attn_is_a_clear_error(family, tmp_path, monkeypatch):
    monkeypatch.delitem(navit_attention._FLASH_VARLEN, "fn", raising=False)
    model = build(family, "flash_attention_2")
    with pytest.raises(ImportError, match="flash-attn"):
        model(*packed_inputs(model.config, random_grids(5)))
    with pytest.raises((ImportError, ValueError)):
        AutoModel.from_pretrained(
            hub_folder(build(family), tmp_path / family), trust_remote_code=True, attn_implementation="flash_attention_2"
        )


# -- training -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("family", NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(family, use_reentrant):
    """Checkpointed layers recompute their forward in the backward (the first layer's q projection runs twice) and
    give every parameter the gradient of the plain run; reentrant checkpointing through `enable_input_require_grads`
    (what adapters use)."""
    grids = random_grids(6)
    grads = []
    for checkpointing in (False, True):
        model = build(family).train()
        encoder = FAMILIES[family].encoder(model)
        calls = []
        attention_module(encoder.layers[0]).q_proj.register_forward_hook(lambda *args: calls.append(1))
        if checkpointing:
            enable_checkpointing(model, use_reentrant=use_reentrant)
            if use_reentrant:
                model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
            assert encoder.gradient_checkpointing
        pixel_values, grid = packed_inputs(model.config, grids)
        torch.manual_seed(0)  # DINOv3's RoPE augmentation: the same draws in both runs
        loss_of(model(pixel_values, grid)).backward()
        assert len(calls) == (2 if checkpointing else 1)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    expected = {name for name, _ in model.named_parameters()} - set(FAMILIES[family].unused_parameters)
    assert grads[0].keys() == grads[1].keys() == expected
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# -- torch.compile --------------------------------------------------------------------------------------------------


COMPILE_CASES = [(family, "sdpa") for family in NAMES] + [("siglip2-windowed", "eager"), ("aimv2", "eager")]


@pytest.mark.parametrize("family, backend", COMPILE_CASES, ids=[f"{f}-{b}" for f, b in COMPILE_CASES])
def test_compiled_inference_does_not_recompile_for_new_batch_compositions(family, backend):
    """One compilation serves every batch: after the first call, new image counts, sizes and sequence-length mixes
    reuse the compiled graphs (torch would raise on any recompile) and match eager mode; the attention runs inside
    the core's opaque op."""
    torch._dynamo.reset()
    model = build(family, backend)
    counter = GraphCounter()
    compiled = torch.compile(model, dynamic=True, backend=counter)
    with torch.no_grad():
        compiled(*packed_inputs(model.config, random_grids(7)))
        graphs_after_first_batch = counter.graphs
        assert graphs_after_first_batch > 0
        with torch._dynamo.config.patch(error_on_recompile=True):
            for grids in NEW_BATCHES:
                pixel_values, grid = packed_inputs(model.config, grids)
                assert_outputs_close(compiled(pixel_values, grid), model(pixel_values, grid), atol=1e-5, rtol=1e-5)
    assert counter.graphs == graphs_after_first_batch
    assert "siglip2_navit.packed_attention" in counter.code


TRAINING_CASES = [(family, "sdpa") for family in NAMES] + [("siglip2-windowed", "eager")]


@pytest.mark.parametrize("family, backend", TRAINING_CASES, ids=[f"{f}-{b}" for f, b in TRAINING_CASES])
def test_compiled_training_matches_eager_gradients_without_recompiles(family, backend):
    """Training under torch.compile: the op's backward (the attention recomputed under torch.func.vjp) gives the
    outputs and every parameter's gradient of eager mode (DINOv3's per-image RoPE draws run eagerly, seeded), and
    batches of other compositions reuse the compiled graphs."""
    torch._dynamo.reset()
    model = build(family, backend).train()
    counter = GraphCounter()
    compiled = torch.compile(model, dynamic=True, backend=counter)
    for i, grids in enumerate([random_grids(8), NEW_BATCHES[1], NEW_BATCHES[3]]):
        pixel_values, grid = packed_inputs(model.config, grids)
        results = []
        for run in (model, compiled):
            model.zero_grad()
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                torch.manual_seed(i)
                out = run(pixel_values, grid)
                loss_of(out).backward()
            results.append((out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
        (expected, expected_grads), (actual, grads) = results
        assert_outputs_close(actual, expected, atol=1e-5, rtol=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
        if i == 0:
            graphs = counter.graphs
    assert counter.graphs == graphs
    assert "siglip2_navit.packed_attention" in counter.code  # the attention ran through the opaque op


# -- the CPU block schedule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True], ids=["all-tokens", "keep_indices"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("family", NAMES)
def test_cpu_block_schedule_matches_one_op_over_all_tokens(family, backend, keep, monkeypatch):
    """CPU inference runs each layer block by block (whole frames or windows per block, RoPE and prefix rows sliced
    per block, the MLP in pieces): the outputs and every layer's hidden states of one op over all tokens, also with
    two layer buffers used in turn; a frame longer than the budget is a block of its own."""
    model = build(family, backend, num_hidden_layers=3)
    grids = random_grids(9, num_images=5)
    pixel_values, grid = packed_inputs(model.config, grids)
    keep_indices = model.sample_keep_indices(grid, 0.4, generator=torch.Generator().manual_seed(1)) if keep else None
    layout = model.plan(pixel_values, grid, keep_indices)
    frame_lengths = layout.full.cu_seqlens_host.diff()
    budget = int(frame_lengths.max()) - 1  # the longest frame alone is above it
    encoder = FAMILIES[family].encoder(model)
    monkeypatch.setattr(navit_core, "_MLP_PIECE_BYTES", 7 * encoder.layers[0].mlp_width * 4)  # 7-token MLP pieces
    calls = record_blocked_calls(monkeypatch, type(encoder.layers[0]))
    with torch.no_grad():
        model.config.cpu_block_tokens = None
        expected = model(pixel_values, grid, keep_indices=keep_indices, output_hidden_states=True)
        assert calls == []
        model.config.cpu_block_tokens = budget
        blocked = model(pixel_values, grid, keep_indices=keep_indices, output_hidden_states=True)
        assert len(calls) == 3 and all(len(sizes) > 2 for sizes in calls), calls
        assert any(size > budget for sizes in calls for size in sizes)  # the longest frame alone
        buffers_in_turn = model(pixel_values, grid, keep_indices=keep_indices)  # no hidden states kept: 2 buffers
    for name, want in outputs_of(expected).items():
        assert_close_at_scale(getattr(blocked, name), want, 1e-6, name)
        assert_close_at_scale(getattr(buffers_in_turn, name), want, 1e-6, name)
    assert len(blocked.hidden_states) == len(expected.hidden_states) == 4
    for got, want in zip(blocked.hidden_states, expected.hidden_states):  # each layer's output kept intact
        assert_close_at_scale(got, want, 1e-6)


# -- keep_indices ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NAMES)
def test_keep_indices_of_every_row_is_the_plain_forward_and_sampling_keeps_whole_blocks(family):
    model = build(family)
    grids = random_grids(10)
    pixel_values, grid = packed_inputs(model.config, grids)
    stride = model.config.hidden_stride
    with torch.no_grad():
        plain = model(pixel_values, grid, output_hidden_states=True)
        every = model(pixel_values, grid, output_hidden_states=True, keep_indices=torch.arange(pixel_values.shape[0]))
        keep = model.sample_keep_indices(grid, 0.5, generator=torch.Generator().manual_seed(0))
        dropped = model(pixel_values, grid, keep_indices=keep)
    assert_outputs_close(every, plain, atol=0, rtol=0)
    assert len(every.hidden_states) == len(plain.hidden_states) == model.config.num_hidden_layers + 1
    for a, b in zip(every.hidden_states, plain.hidden_states):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(keep.view(-1, stride**2), keep.view(-1, stride**2)[:, :1] + torch.arange(stride**2))  # blocks
    assert torch.equal(keep, model.sample_keep_indices(grid, 0.5, generator=torch.Generator().manual_seed(0)))
    assert keep.numel() < pixel_values.shape[0]
    assert dropped.last_hidden_state.shape == (keep.numel(), model.config.hidden_size)
    for name in ("pooler_output", "prefix_tokens"):  # per image or per frame: as many rows as without dropping
        if getattr(plain, name, None) is not None:
            assert getattr(dropped, name).shape == getattr(plain, name).shape
    assert model.get_image_features(pixel_values, grid).shape == (len(grids), model.config.hidden_size)


@pytest.mark.parametrize("family", NAMES)
def test_an_image_that_keeps_no_token_is_refused_only_by_a_pooling_head(family):
    """A pooling head over every image needs a token of every frame (a ValueError before compute); without one the
    other images encode as usual (DINOv3's empty frames still encode their CLS and registers)."""
    model = build(family)
    grids = random_grids(11)
    pixel_values, grid = packed_inputs(model.config, grids)
    first = grids[0][0] * grids[0][1] * grids[0][2]
    keep = torch.arange(first, pixel_values.shape[0])  # image 0 keeps nothing
    if model._pools_per_image():
        with pytest.raises(ValueError, match=r"Frames \[0.*keep no tokens"):
            model(pixel_values, grid, keep_indices=keep)
        model = build(family, **FAMILIES[family].headless)
        assert not model._pools_per_image()
    with torch.no_grad():
        out = model(pixel_values, grid, keep_indices=keep)
    assert out.last_hidden_state.shape == (keep.numel(), model.config.hidden_size)
    assert (out.pooler_output is None) == (not model._has_pooler())
    for tensor in outputs_of(out).values():
        assert bool(torch.isfinite(tensor).all())
    if getattr(out, "prefix_tokens", None) is not None:
        assert out.prefix_tokens.shape[0] == sum(t for t, _, _ in grids)  # every frame, the empty ones too


# -- bad inputs -----------------------------------------------------------------------------------------------------


def bad_inputs(config) -> dict:
    """{case: (pixel_values, grid_thws, forward kwargs, message)} for a model of `config` (width C·T·p·p)."""
    C, T, p = config.num_channels, config.temporal_patch_size, config.patch_size
    width, s = C * T * p * p, config.hidden_stride
    rows = s * s
    ok = torch.zeros(rows, width)
    grid = [[1, s, s]]
    rng = torch.Generator().manual_seed(0)
    packed = torch.randn(3 * rows, width, generator=rng)
    three = [[1, s, s], [1, s, 2 * s]]
    return {
        "pixel_values 3-D": (ok[None], grid, {}, "2-D"),
        "pixel_values wrong width": (torch.zeros(rows, width - 1), grid, {},
                                     rf"C·T·p·p = {C}·{T}·{p}·{p} = {width} values, got {width - 1}"),
        "pixel_values integer": (ok.long(), grid, {}, "floating-point"),
        "pixel_values not a tensor": (ok.numpy(), grid, {}, "torch.Tensor"),
        "rows != sum t*h*w": (torch.zeros(rows + 1, width), grid, {},
                              rf"describes Σ t·h·w = {rows} patches but `pixel_values` has {rows + 1} rows"),
        "grid not [n, 3]": (ok, [[s, s]], {}, r"\[n_images, 3\]"),
        "grid 1-D": (ok, [1, s, s], {}, r"\[n_images, 3\]"),
        "grid float": (ok, torch.tensor([[1.0, s, s]]), {}, "must hold integers"),
        "grid zero entry": (ok, [[0, s, s]], {}, "positive"),
        "grid negative entry": (ok, [[1, -s, -s]], {}, "positive"),
        "h not divisible by stride": (torch.zeros((s + 1) * s, width), [[1, s + 1, s]], {}, f"divisible by hidden_stride={s}"),
        "w not divisible by stride": (torch.zeros((s + 1) * s, width), [[1, s, s + 1]], {}, f"divisible by hidden_stride={s}"),
        "NaN pixels": (packed.index_fill(0, torch.tensor([rows + 1]), float("nan")), three, {}, "NaN or infinite"),
        "inf pixels": (torch.full((rows, width), float("inf")), grid, {}, "NaN or infinite"),
        "-inf pixel": (packed.index_fill(0, torch.tensor([2]), float("-inf")), three, {}, "NaN or infinite"),
        "huge negative pixel": (packed.index_fill(0, torch.tensor([rows]), -1e6), three, {}, "magnitude 1e\\+06"),
        "empty pixel_values": (torch.zeros(0, width), torch.zeros(0, 3, dtype=torch.long), {}, "empty"),
        "empty grid": (ok, torch.zeros(0, 3, dtype=torch.long), {}, "empty"),
        "empty grid list": (ok, [], {}, "`grid_thws` is empty"),
        "empty grid tuple": (ok, (), {}, "`grid_thws` is empty"),
        "keep_indices part of a block": (packed, three, {"keep_indices": torch.arange(rows - 1)},
                                         rf"whole {s}×{s} blocks"),
        "keep_indices not increasing": (packed, three, {"keep_indices": torch.arange(rows).flip(0)},
                                        "strictly increasing"),
        "keep_indices out of range": (packed, three, {"keep_indices": torch.tensor([1000])},
                                      rf"must lie in \[0, {3 * rows}\)"),
        "unexpected keyword": (packed, three, {"image_sizes": [(8, 12)]}, r"Unexpected arguments \['image_sizes'\]"),
    }


BAD_CASES = list(bad_inputs(FAMILIES["aimv2"].config_class(**FAMILIES["aimv2"].config)))


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("family", NAMES)
def test_bad_inputs_are_value_errors_before_any_compute(family, case, monkeypatch):
    model = build(family)
    pixel_values, grid, kwargs, message = bad_inputs(model.config)[case]
    monkeypatch.setattr(model, "encode", lambda *a, **k: pytest.fail("computed before validating"))
    with pytest.raises(ValueError, match=message):
        model(pixel_values, grid, **kwargs)
