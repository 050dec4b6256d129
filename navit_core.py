# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The packed (NaViT) core shared by every encoder family: SigLIP2, AIMv2 and DINOv3 are thin files over this module.

Images of any size are packed into one sequence; this module knows nothing about a family's embeddings or blocks:

    pixel_values [N, C·T·p·p], grid_thws [n_images, 3]
      -> validate_inputs (host)      every error is raised here, before any compute
      -> build_packed_layout (host)  working order, token positions, attention partitions (`cu_seqlens`), windows,
                                     prefix-token slots (CLS/registers inside each frame's sequence), `keep_indices`
      -> family embeddings           patch rows [K, hidden] (+ prefix rows: `assemble_sequence`)
      -> PackedEncoder               the family's PackedEncoderLayer stack; attention per frame (or window) through
                                     one packed attention interface (eager / sdpa / flash_attention_2 / registered)
      -> restore_index               patch tokens back in input order

Attention never sees a dense mask over the packed batch: `flash_attention_2` runs varlen kernels on `cu_seqlens`,
`sdpa` uses torch's varlen kernel on CUDA or one `scaled_dot_product_attention` call per group of equal-length
sequences, `eager` does matmul + softmax per sequence (and can return the attention maps).
"""

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .navit_attention import (
    PACKED_ATTENTION_FUNCTIONS,
    cpu_has_bf16_matmul,
    cpu_vendor,
    preferred_dtype,
    preferred_dtype_reason,
    _flash_attn_varlen_func,
    _opaque_packed_attention,
    _use_opaque_attention,
    eager_packed_attention,
    flash_packed_attention,
    get_packed_attention_interface,
    sdpa_packed_attention,
)
from .navit_layout import (
    AttentionBlock,
    AttentionPartition,
    FamilyPlan,
    GridLike,
    PackedLayout,
    _check_grids,
    _grid_to_list,
    never_specialize,
    assemble_sequence,
    attention_blocks,
    build_packed_layout,
    check_dtype_settings,
    is_int,
    is_real,
    split_per_image,
    validate_inputs,
    validate_packed_config,
)


logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embedding (2D)
# ----------------------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k [K, heads, head_dim] in float32 and cast back."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [K, 1, head_dim]
    q, k = query.float(), key.float()
    q_rot = q * cos + rotate_half(q) * sin
    k_rot = k * cos + rotate_half(k) * sin
    return q_rot.to(query.dtype), k_rot.to(key.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# CPU block schedule: when inference runs block by block (whole sequences per block) instead of over all tokens
# ----------------------------------------------------------------------------------------------------------------------


# The CPU block schedule runs the MLP in pieces whose [piece, intermediate] activation stays below this size: glibc
# serves allocations below its mmap threshold (at most 32 MiB) from recycled heap memory, larger ones with fresh pages.
_MLP_PIECE_BYTES = 16 * 2**20


def has_hooks(module: nn.Module) -> bool:
    """Whether forward hooks (own, global or accelerate's) could observe `module` or one of its submodules."""
    global_hooks = getattr(nn.modules.module, "_global_forward_hooks", None) or getattr(
        nn.modules.module, "_global_forward_pre_hooks", None
    )
    return bool(global_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in module.modules()
    )


def cpu_block_tokens(config, tensor: torch.Tensor) -> Optional[int]:
    """Tokens per block when work on `tensor` runs the CPU block schedule (CPU inference: no autograd, not traced by
    torch.compile, `config.cpu_block_tokens` set), else None."""
    if (
        not config.cpu_block_tokens
        or tensor.device.type != "cpu"
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    ):
        return None
    return config.cpu_block_tokens


# oneDNN post-ops of transformers' `hidden_act` names (None: no activation): (algorithm, approximation)
ONEDNN_ACTIVATIONS = {None: ("none", ""), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}


@functools.lru_cache(maxsize=None)
def _onednn_linear() -> Optional[Callable]:
    """torch's oneDNN linear with a fused post-op (`mkldnn::_linear_pointwise`), or None where this build has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def fused_linear(linear: nn.Linear, hidden_states: torch.Tensor, activation: Optional[str] = None) -> Optional[torch.Tensor]:
    """`activation(linear(hidden_states))` [n, out] as one oneDNN GEMM with the bias and the activation applied in its
    epilogue (no separate pass over the [n, out] output: a tanh-GELU pass costs ~15 % of fc1's GEMM in bf16), or None
    where that does not apply and the caller runs its modules: not a CPU, a dtype other than fp32 (or bf16 on a CPU
    with native bf16 matmuls), training mode or autograd (a reentrant checkpoint's no-grad forward must match its
    recomputation), torch.compile tracing, an activation without a oneDNN post-op, hooks on `linear` (it is not called
    as a module), or a torch build without the op."""
    if torch.compiler.is_compiling():  # checked first: the rest is host-side Python torch.compile must not trace
        return None
    kernel = _onednn_linear()
    if (
        kernel is None
        or activation not in ONEDNN_ACTIVATIONS
        or hidden_states.device.type != "cpu"
        or hidden_states.dim() != 2
        or not (hidden_states.dtype == torch.float32 or (hidden_states.dtype == torch.bfloat16 and cpu_has_bf16_matmul()))
        or linear.weight.dtype != hidden_states.dtype
        or linear.training
        or (torch.is_grad_enabled() and (hidden_states.requires_grad or linear.weight.requires_grad))
        or has_hooks(linear)
    ):
        return None
    algorithm, approximation = ONEDNN_ACTIVATIONS[activation]
    return kernel(hidden_states, linear.weight, linear.bias, algorithm, [], approximation)  # [n, out]


# Bias-only projections: oneDNN with the bias in its epilogue spares the pass that writes the broadcast bias into the
# output before the GEMM accumulates onto it, which cost AMD EPYC (Zen 4) ~140 ms of an fp32 so400m-width forward. On
# Intel Xeon (AMX) torch's own `F.linear` is the faster one in fp32 (2-layer so400m-width forward, 3,440 tokens,
# paired: 1,013 → 976 ms; 1 layer with the retained-memory allocator: 506 → 493 ms), while bf16 gains from the
# epilogue there too (1 layer 121 → 117 ms, 2 layers 228 → 217 ms with that allocator; a tie with glibc's defaults),
# so fp32 on Intel CPUs keeps `F.linear`. fc1 + GELU stays fused everywhere.
FP32_BIAS_EPILOGUE_SKIPPED_ON = ("GenuineIntel",)


def linear(module: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """`module(hidden_states)`; in CPU inference one oneDNN GEMM with the bias in its epilogue (`fused_linear`), except
    in fp32 on the CPUs of `FP32_BIAS_EPILOGUE_SKIPPED_ON`."""
    skipped = torch.compiler.is_compiling() or (  # compile: no host-side Python
        hidden_states.dtype == torch.float32 and cpu_vendor() in FP32_BIAS_EPILOGUE_SKIPPED_ON
    )
    fused = None if skipped else fused_linear(module, hidden_states)
    return module(hidden_states) if fused is None else fused


# ----------------------------------------------------------------------------------------------------------------------
# Modules every family builds on: self-attention over packed sequences, a residual block, the encoder loop
# ----------------------------------------------------------------------------------------------------------------------


class PackedPatchEmbedding(nn.Conv2d):
    """A family's patch embedding: Conv2d parameters (`[hidden, C·T, p, p]` + bias, the checkpoints' layout) applied
    to packed patch rows `[n, C·T·p·p]` as one matmul. A module call, so that hooks on `get_input_embeddings()` see it
    (e.g. `enable_input_require_grads` for adapters with reentrant gradient checkpointing)."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)  # [n, hidden]

    def patch_rows(self, pixel_values: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """The kept rows of `pixel_values` in working order, on this module's device and dtype: [K, C·T·p·p]."""
        return pixel_values.to(self.weight.device).index_select(0, layout.token_rows).to(self.weight.dtype)


@dataclass(frozen=True)
class AttentionContext:
    """What every layer's attention needs in one forward, built once per forward by `PackedEncoder.forward` (one per
    attention kind: full, windowed) and handed down unchanged: a family's `attention_branch` passes it on to
    `PackedSelfAttention` and reads fields by name (e.g. `context.partition` for DINOv3's per-frame drop path)."""

    position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]]  # rotary cos/sin [S, head_dim] each; None: no RoPE
    partition: AttentionPartition  # the sequences attention stays within: frames (full layers) or windows
    attention_interface: Callable  # the packed attention function of this forward's backend
    output_attentions: bool = False  # also return the per-sequence attention maps (eager)

    def for_block(self, block: AttentionBlock) -> "AttentionContext":
        """This context for the rows `block.start:block.end` alone (CPU block schedule; no attention maps)."""
        rows = slice(block.start, block.end)
        rope = None if self.position_embeddings is None else tuple(t[rows] for t in self.position_embeddings)
        return AttentionContext(rope, block.partition, self.attention_interface)


class PackedSelfAttention(nn.Module):
    """q/k/v projections + the packed attention interface; a family adds its output projection (under its own
    parameter name) and returns it from `project_output`."""

    def __init__(
        self, hidden_size: int, num_heads: int, dropout: float, bias: tuple[bool, bool, bool] = (True, True, True)
    ):
        super().__init__()
        self.embed_dim = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.is_causal = False
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias[0])
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=bias[1])
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=bias[2])

    def project_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        """The family's output projection of the attention output [S, hidden]."""
        raise NotImplementedError

    def forward(
        self, hidden_states: torch.Tensor, context: AttentionContext
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """Attention of `hidden_states` [S, hidden] within each sequence of `context.partition`, output-projected, and
        the per-sequence maps when asked (eager)."""
        num_tokens = hidden_states.shape[0]
        shape = (num_tokens, self.num_heads, self.head_dim)
        query = linear(self.q_proj, hidden_states).view(shape)  # [S, heads, head_dim]
        key = linear(self.k_proj, hidden_states).view(shape)
        value = linear(self.v_proj, hidden_states).view(shape)
        if context.position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *context.position_embeddings)
        attn_output, attn_weights = context.attention_interface(
            self,
            query,
            key,
            value,
            context.partition,
            scaling=self.scale,
            dropout=self.dropout if self.training else 0.0,
            output_attentions=context.output_attentions,
        )
        return self.project_output(attn_output.reshape(num_tokens, self.embed_dim)), attn_weights  # [S, hidden]


class PackedEncoderLayer(nn.Module):
    """Residual block `x + attention_branch(x)`, then `x + mlp_branch(x)`; a family defines the two branches (norms,
    layer scales, MLP kind), this class runs them over the whole batch or, for CPU inference, block by block."""

    full_attention: bool = True  # False: the layer attends within windows
    mlp_width: int = 1  # widest per-token MLP activation (sizes the CPU block schedule's MLP pieces)

    def attention_branch(
        self, hidden_states: torch.Tensor, context: AttentionContext
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """The attention residual branch of `hidden_states` [S, hidden] (norm, `PackedSelfAttention(·, context)`,
        layer scale) and the attention maps it returned."""
        raise NotImplementedError

    def mlp_branch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The token-wise MLP residual branch of `hidden_states` [n, hidden] (norm, MLP, layer scale)."""
        raise NotImplementedError

    def forward(
        self, hidden_states: torch.Tensor, context: AttentionContext
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        attn_output, attn_weights = self.attention_branch(hidden_states, context)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp_branch(hidden_states)
        return hidden_states, attn_weights

    def forward_blocked(
        self,
        hidden_states: torch.Tensor,
        blocks: Sequence[tuple[AttentionBlock, AttentionContext]],
        out: torch.Tensor,
    ) -> torch.Tensor:
        """`forward` for inference (no autograd), computed block by block into `out` [S, hidden] (not `hidden_states`).

        Same math as `forward`: attention never crosses a block's sequences, and the MLP is token-wise, run in pieces
        whose [piece, mlp_width] activation stays below `_MLP_PIECE_BYTES`. Every intermediate is block-sized.
        """
        piece = max(1, _MLP_PIECE_BYTES // (self.mlp_width * hidden_states.element_size()))
        for block, context in blocks:
            rows = slice(block.start, block.end)
            residual = hidden_states[rows]  # [n, hidden]
            attn_output, _ = self.attention_branch(residual, context)
            block_out = torch.add(residual, attn_output, out=out[rows])
            for chunk in block_out.split(piece):
                chunk.add_(self.mlp_branch(chunk))
        return out


class PackedEncoder(nn.Module):
    """The layer loop over the packed sequence: attention backend resolved once per forward (opaque op under
    torch.compile), gradient checkpointing, the CPU block schedule, hidden states and attention maps."""

    def __init__(self, config, layers: Sequence[PackedEncoderLayer]):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(layers)
        self.gradient_checkpointing = False

    def rotary_embeddings(self, layout: PackedLayout) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The family's rotary cos/sin [S, head_dim] for this batch (computed once per forward), or None."""
        return None

    def attention_interface(self, hidden_states: torch.Tensor, output_attentions: bool) -> Callable:
        """The packed attention function of `config._attn_implementation`, read at call time (runtime switching)."""
        implementation = self.config._attn_implementation
        if output_attentions and implementation != "eager":
            logger.warning_once(
                f"output_attentions=True needs the eager attention backend; running eager instead of "
                f"{implementation!r} for this call."
            )
            implementation = "eager"
        name = implementation or "sdpa"
        dropout = self.config.attention_dropout if self.training else 0.0
        if _use_opaque_attention(name, hidden_states, dropout, output_attentions):
            return _opaque_packed_attention(name)  # one graph for every batch composition
        return get_packed_attention_interface(implementation)

    def attention_contexts(
        self, hidden_states: torch.Tensor, layout: PackedLayout, output_attentions: bool
    ) -> dict[bool, AttentionContext]:
        """This forward's attention context per layer kind (True: full attention per frame; False: per window, when
        the layout has windows): the backend and the rotary embeddings are resolved once, here."""
        interface = self.attention_interface(hidden_states, output_attentions)
        rope = self.rotary_embeddings(layout)
        contexts = {True: AttentionContext(rope, layout.full, interface, output_attentions)}
        if layout.window is not None:
            contexts[False] = AttentionContext(rope, layout.window, interface, output_attentions)
        return contexts

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: PackedLayout,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]], Optional[tuple]]:
        """Run all layers on `hidden_states` [S, hidden] in the layout's working order.

        Returns the last hidden state and (when asked) every layer's hidden states and attention maps, all in the
        working order; the caller restores the input order.
        """
        contexts = self.attention_contexts(hidden_states, layout, output_attentions)
        blocks = self._cpu_blocks(hidden_states, contexts, output_attentions)
        spare = None  # block schedule: a layer's output buffer is reused two layers later unless it is returned

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for index, layer in enumerate(self.layers):
            context = contexts[layer.full_attention]
            if blocks is not None:
                out = spare if spare is not None else torch.empty_like(hidden_states)
                spare = hidden_states if index > 0 and not output_hidden_states else None  # never the caller's input
                hidden_states = layer.forward_blocked(hidden_states, blocks[layer.full_attention], out)
                attn_weights = None
            elif self.gradient_checkpointing and self.training:
                hidden_states, attn_weights = self._gradient_checkpointing_func(layer.__call__, hidden_states, context)
            else:
                hidden_states, attn_weights = layer(hidden_states, context)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return hidden_states, all_hidden_states, all_attentions

    def encode_and_restore(
        self,
        hidden_states: torch.Tensor,
        layout: PackedLayout,
        final_norm: nn.Module,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[BaseModelOutput, torch.Tensor]:
        """Every family's tail after its embeddings: all layers on the sequence `hidden_states` [S, hidden] (working
        order), `final_norm` of its patch rows, and the outputs in input order; also the last sequence [S, hidden]
        (working order, prefix rows included)."""
        sequence, all_hidden_states, all_attentions = self(
            hidden_states, layout, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        last_hidden_state = final_norm_in_input_order(sequence, layout, final_norm, self.config)  # [K, hidden]
        encoded = restore_encoder_outputs(last_hidden_state, all_hidden_states, all_attentions, layout, self.layers)
        return encoded, sequence

    def _cpu_blocks(
        self, hidden_states: torch.Tensor, contexts: dict[bool, AttentionContext], output_attentions: bool
    ) -> Optional[dict[bool, tuple[tuple[AttentionBlock, AttentionContext], ...]]]:
        """The blocks of the CPU block schedule per attention kind (True: full), each with its context, or None when
        this forward runs every op over all tokens: off (`cpu_block_tokens=None`), not CPU, autograd or training,
        attention maps asked, torch.compile tracing, or hooks on the layers (they would see blocks instead of the
        whole batch)."""
        max_tokens = cpu_block_tokens(self.config, hidden_states)
        if max_tokens is None or self.training or output_attentions or has_hooks(self.layers):
            return None
        return {
            kind: tuple((block, context.for_block(block)) for block in attention_blocks(context.partition, max_tokens))
            for kind, context in contexts.items()
        }


def final_norm_in_input_order(hidden_states: torch.Tensor, layout: PackedLayout, norm: nn.Module, config) -> torch.Tensor:
    """`norm` of the patch rows of `hidden_states` [S, hidden] (working order), in input order: [K, hidden]. CPU
    inference normalises in place, piece by piece (no second [K, hidden] temporary)."""
    restore = layout.restore_index
    piece = cpu_block_tokens(config, hidden_states)
    if piece is None or has_hooks(norm):
        return norm(hidden_states).index_select(0, restore)
    output = hidden_states.index_select(0, restore)
    for rows in output.split(piece):
        rows.copy_(norm(rows))
    return output


def restore_encoder_outputs(
    last_hidden_state: torch.Tensor,
    all_hidden_states: Optional[tuple[torch.Tensor, ...]],
    all_attentions: Optional[tuple],
    layout: PackedLayout,
    layers: Sequence[PackedEncoderLayer],
) -> BaseModelOutput:
    """Wrap the encoder's outputs in input order: `last_hidden_state` (already restored), hidden states (patch rows),
    per-sequence attention maps (sequences sorted back by frame or window, tokens in input order)."""
    if all_hidden_states is not None:
        all_hidden_states = tuple(h.index_select(0, layout.restore_index) for h in all_hidden_states)
    if all_attentions is not None:
        all_attentions = tuple(
            _restore_attention_order(maps, layout, layers[i].full_attention) for i, maps in enumerate(all_attentions)
        )
    return BaseModelOutput(last_hidden_state=last_hidden_state, hidden_states=all_hidden_states, attentions=all_attentions)


def _restore_attention_order(maps: tuple, layout: PackedLayout, full_attention: bool) -> tuple:
    """Per-sequence maps of the working order -> input order: sequences sorted back by frame (or window), and inside
    each frame the prefix tokens first, then the patches (window-major in the working order) in input order."""
    partition = layout.full if full_attention else layout.window
    if not full_attention:  # inside a window, the working order keeps the input order
        return tuple(maps[i] for i in partition.input_seq_order)
    restored = []
    cu = partition.cu_seqlens_host.tolist()
    prefix = torch.arange(layout.num_prefix_tokens, device=layout.restore_index.device)
    output_start = 0  # frames are contiguous in the output, in input order
    for seq_id in partition.input_seq_order:
        length = cu[seq_id + 1] - cu[seq_id] - layout.num_prefix_tokens  # patches of this frame
        patches = layout.restore_index[output_start : output_start + length] - cu[seq_id]  # local sequence rows
        local = torch.cat([prefix, patches])
        restored.append(maps[seq_id][:, local][:, :, local])
        output_start += length
    return tuple(restored)


def per_image_groups(token_counts: Sequence[int]) -> dict[int, list[int]]:
    """Image ids grouped by token count (first-seen order): pooling heads batch equal-length images together."""
    groups: dict[int, list[int]] = {}
    for image_id, count in enumerate(token_counts):
        groups.setdefault(count, []).append(image_id)
    return groups


def segment_mean(rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Mean of consecutive segments of `rows` [Σ counts, D] -> [len(counts), D]."""
    return torch.stack([segment.mean(dim=0) for segment in rows.split(list(counts))])


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained-model base: attention switching, planning, token dropping, per-image features
# ----------------------------------------------------------------------------------------------------------------------


class PackedPreTrainedModel(PreTrainedModel):
    """What every packed family's PreTrainedModel shares: validation, planning, the forward, attention switching,
    token dropping and per-image features.

    The family contract, the one list of what a family file implements or overrides (the core's default in brackets;
    no default: required). Nothing else of the core is overridden; tests/test_family_contract.py checks both ways.

    The model (a subclass of this class):
      - `PackedPreTrainedModel.config_class`, `PackedPreTrainedModel.base_model_prefix`,
        `PackedPreTrainedModel._no_split_modules`: transformers' class attributes.
      - `PackedPreTrainedModel._init_weights(module)`: transformers' init of the family's modules.
      - `PackedPreTrainedModel.get_input_embeddings()`: the `PackedPatchEmbedding`.
      - `PackedPreTrainedModel.encode(pixel_values, layout, output_attentions, output_hidden_states, **inputs)`:
        embeddings, the encoder (its `encode_and_restore`) and its final norm, in input order: a
        `BaseModelOutput` (tensors only: the part torch.compile traces).
      - `PackedPreTrainedModel.build_outputs(encoded, layout, return_dict)`: the model output from `encode`'s
        result: pooling and the family's extra fields. `forward` runs it outside torch.compile through
        `_build_outputs_eagerly`, which is never overridden.
      - `PackedPreTrainedModel._layout_options()`: extra `build_packed_layout` arguments (`window_blocks`,
        `num_prefix_tokens`) [none].
      - `PackedPreTrainedModel._plan_family(layout, grids)`: the family's `FamilyPlan` subclass for this batch,
        stored as `layout.family` (host side, before any compute; may raise ValueError) [an empty `FamilyPlan`].
      - `PackedPreTrainedModel._family_inputs(pixel_values, kwargs)`: the checked extra `forward` inputs, passed to
        `encode` as keywords (DINOv3's `bool_masked_pos`) [none: any keyword is a ValueError].
      - `PackedPreTrainedModel._pools_per_image()`: a pooling head over every image, so no frame may lose all its
        tokens [False]. `PackedPreTrainedModel._has_pooler()`: `pooler_output` exists [`_pools_per_image()`].

    The building blocks (subclasses of the core's modules):
      - `PackedSelfAttention.project_output(attn_output)`: the output projection, under the family's parameter name.
      - `PackedEncoderLayer.attention_branch(hidden_states, context)`: norm, `PackedSelfAttention(·, context)`,
        layer scale; hands the `AttentionContext` on unchanged and returns the attention maps it got.
      - `PackedEncoderLayer.mlp_branch(hidden_states)`: norm, MLP, layer scale (token-wise).
      - `PackedEncoderLayer.forward(hidden_states, context)`: only to change the residual sum (DINOv3's per-frame
        drop path in training) [`x + attention_branch(x)`, then `+ mlp_branch`].
      - `PackedEncoderLayer.full_attention`: attends per frame (False: per window) [True].
        `PackedEncoderLayer.mlp_width`: widest per-token MLP activation, which sizes the CPU block schedule's MLP
        pieces [1].
      - `PackedEncoder.rotary_embeddings(layout)`: cos/sin [S, head_dim] per token, or None without RoPE [None].

    A family module imports only the names in `navit_core.__all__`, and defines no module-level name of the core's
    modules (no `build_packed_layout` of another signature).
    """

    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Runtime switching always works: the backend is read from `config._attn_implementation` at every forward.
        (transformers 4.56-4.57 guess this from the source text, and their guess is wrong for these files.)"""
        return True

    if not hasattr(PreTrainedModel, "set_attn_implementation"):  # older transformers 4.5x have no runtime switch

        def set_attn_implementation(self, attn_implementation: str) -> None:
            """Switch the attention backend at runtime (the backend is read from the config at every forward)."""
            if attn_implementation not in PACKED_ATTENTION_FUNCTIONS:
                raise ValueError(
                    f"attn_implementation must be one of {sorted(PACKED_ATTENTION_FUNCTIONS)}, got {attn_implementation!r}."
                )
            if attn_implementation == "flash_attention_2":
                _flash_attn_varlen_func()  # a clear ImportError now rather than at the next forward
            self.config._attn_implementation = attn_implementation

    # -- planning (host side, once per forward) --
    def _layout_options(self) -> dict:
        """Keyword arguments of `build_packed_layout` for this model: `window_blocks`, `num_prefix_tokens`."""
        return {}

    def _plan_family(self, layout: PackedLayout, grids: Sequence[tuple[int, int, int]]) -> FamilyPlan:
        """What the family derives once per batch on top of the layout (stored as `layout.family`)."""
        return FamilyPlan()

    def _pools_per_image(self) -> bool:
        """Whether the model pools every image's tokens (then no frame may lose all its tokens)."""
        return False

    def _has_pooler(self) -> bool:
        """Whether `forward` returns a `pooler_output` (a pooling head, or DINOv3's CLS token)."""
        return self._pools_per_image()

    def _output_flags(self, output_hidden_states, output_attentions, return_dict) -> tuple[bool, bool, bool]:
        config = self.config
        return (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states,
            output_attentions if output_attentions is not None else config.output_attentions,
            return_dict if return_dict is not None else config.return_dict,
        )

    # torch.compile: this frame (argument handling, host-side planning) runs eagerly and `encode` (tensors only) is
    # what gets compiled, so the graph has no guards on `grid_thws` or on the batch's composition; pooling runs eagerly.
    @torch.compiler.disable(recursive=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thws: GridLike,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        keep_indices: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `[Σ t·h·w, C·T·p·p]`): packed patch rows, any
                float dtype (cast to the model's dtype inside); may live on another device than the model.
            grid_thws (`torch.LongTensor` / list / array of shape `[n_images, 3]`): (t, h, w) per image in patches;
                may live on any device.
            output_hidden_states (`bool`, *optional*): also return the embedding output and every layer's output
                (patch tokens, input order, before the final norm).
            output_attentions (`bool`, *optional*): per-layer tuples of per-sequence maps `[heads, L, L]` (eager).
            return_dict (`bool`, *optional*): a `ModelOutput` (default) or a plain tuple.
            keep_indices (`torch.LongTensor` of shape `[K]`, *optional*): strictly increasing rows to keep (NaViT
                token dropping, whole hidden_stride blocks; prefix tokens are always kept); outputs then have K rows.
            kwargs: the family's own inputs (`_family_inputs`); anything else is a `ValueError`.
        """
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        layout = self.plan(pixel_values, grid_thws, keep_indices)
        family_inputs = self._family_inputs(pixel_values, kwargs)
        encoded = self.encode(pixel_values, layout, output_attentions, output_hidden_states, **family_inputs)
        return self._build_outputs_eagerly(encoded, layout, return_dict)

    def _family_inputs(self, pixel_values: torch.Tensor, kwargs: dict) -> dict:
        """Check and return the family's extra `forward` inputs (host side, before any compute)."""
        if kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)} for {type(self).__name__}.forward.")
        return {}

    def encode(
        self, pixel_values: torch.Tensor, layout: PackedLayout, output_attentions: bool, output_hidden_states: bool
    ) -> BaseModelOutput:
        """Embeddings, encoder layers and the final norm of a planned batch, outputs in input order (the part
        torch.compile traces: tensors only)."""
        raise NotImplementedError

    def build_outputs(self, encoded: BaseModelOutput, layout: PackedLayout, return_dict: bool):
        """The model output from `encode`'s: pooling and the family's extra fields (the family's part; the base runs
        it eagerly through `_build_outputs_eagerly`)."""
        raise NotImplementedError

    @torch.compiler.disable  # eager: pooled [n_images, ·] outputs never become graph inputs guarded on their size
    def _build_outputs_eagerly(self, encoded: BaseModelOutput, layout: PackedLayout, return_dict: bool):
        """`build_outputs` outside torch.compile (never overridden)."""
        return self.build_outputs(encoded, layout, return_dict)

    @torch.compiler.disable  # host-side planning is never traced: torch.compile would specialize on the batch
    def plan(
        self, pixel_values: torch.Tensor, grid_thws: GridLike, keep_indices: Optional[torch.Tensor] = None
    ) -> PackedLayout:
        """Validate the packed inputs and derive their `PackedLayout` (host side, once per forward)."""
        if isinstance(keep_indices, torch.Tensor):
            keep_indices = keep_indices.cpu()  # planned on the host, like grid_thws
        grids = validate_inputs(pixel_values, grid_thws, self.config, keep_indices)
        if keep_indices is not None:
            keep_indices = keep_indices.long()  # any integer dtype (uint8 would otherwise index as a mask)
        device = self.get_input_embeddings().weight.device
        layout = build_packed_layout(grids, self.config.hidden_stride, device, keep_indices, **self._layout_options())
        if self._pools_per_image() and 0 in layout.frame_token_counts:
            empty = [i for i, n in enumerate(layout.frame_token_counts) if n == 0]
            raise ValueError(
                f"Frames {empty} (counted over all images) keep no tokens, so the pooled output of their image is "
                "undefined (the model has a pooling head): keep at least one block per frame."
            )
        layout.family = self._plan_family(layout, grids)
        return layout

    def sample_keep_indices(
        self, grid_thws: GridLike, drop_rate: float, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """NaViT token dropping: drop `round(drop_rate · groups)` random hidden_stride×hidden_stride groups per frame.

        At least one group per frame is kept (prefix tokens such as CLS are never dropped). Returns sorted row indices
        into the packed batch (CPU int64), ready for `forward(..., keep_indices=...)`; pass a seeded
        `torch.Generator` for reproducible draws.
        """
        drop_rate = float(drop_rate)  # a Python number or a 0-d tensor
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"`drop_rate` must be in [0, 1], got {drop_rate}.")
        stride = self.config.hidden_stride
        group = stride * stride
        grids = _grid_to_list(grid_thws)
        _check_grids(grids, stride)
        kept, offset = [], 0
        for t, h, w in grids:
            groups = (h // stride) * (w // stride)
            n_keep = max(1, groups - round(drop_rate * groups))
            for _ in range(t):
                device = "cpu" if generator is None else generator.device  # a CUDA generator draws on its device
                chosen = torch.randperm(groups, generator=generator, device=device)[:n_keep].sort().values.cpu()
                kept.append((offset + chosen[:, None] * group + torch.arange(group)).flatten())
                offset += groups * group
        return torch.cat(kept)

    def get_image_features(self, pixel_values: torch.Tensor, grid_thws: GridLike, **kwargs) -> torch.Tensor:
        """One embedding per image, `[n_images, hidden]`: the model's `pooler_output` when it has one (SigLIP2/AIMv2
        attention-pooling head; DINOv3's CLS token, averaged over the frames of a video), else the mean of the image's
        `last_hidden_state` tokens (after the final norm)."""
        grids = _grid_to_list(grid_thws)
        counts = [t * h * w for t, h, w in grids]  # tokens per image in last_hidden_state
        keep_indices = kwargs.get("keep_indices")
        if keep_indices is not None and not self._has_pooler():
            if not isinstance(keep_indices, torch.Tensor):
                raise ValueError("`keep_indices` must be a 1-D integer tensor of row positions into `pixel_values`.")
            image_ids = torch.searchsorted(torch.tensor(counts).cumsum(0), keep_indices.cpu().long(), right=True)
            counts = torch.bincount(image_ids, minlength=len(grids)).tolist()
            if 0 in counts:  # before any compute
                raise ValueError(
                    f"Images {[i for i, n in enumerate(counts) if n == 0]} keep no tokens, so their mean embedding is "
                    "undefined: keep at least one block of every image."
                )
        outputs = self(pixel_values, grid_thws, return_dict=True, **kwargs)
        pooled = outputs.pooler_output
        if pooled is None:
            return segment_mean(outputs.last_hidden_state, counts)
        frames = [t for t, _, _ in grids]
        if pooled.shape[0] == sum(frames) and pooled.shape[0] != len(grids):  # one row per frame: average each video
            return segment_mean(pooled, frames)
        return pooled


# What a family module may import: this module's public names and those it re-exports from the layout and the
# attention modules. Everything else is internal to the core.
__all__ = [
    # layout and validation (navit_layout.py)
    "AttentionBlock",
    "AttentionPartition",
    "FamilyPlan",
    "GridLike",
    "PackedLayout",
    "assemble_sequence",
    "attention_blocks",
    "build_packed_layout",
    "check_dtype_settings",
    "is_int",
    "is_real",
    "never_specialize",
    "split_per_image",
    "validate_inputs",
    "validate_packed_config",
    # attention backends (navit_attention.py)
    "PACKED_ATTENTION_FUNCTIONS",
    "cpu_has_bf16_matmul",
    "preferred_dtype",
    "preferred_dtype_reason",
    "eager_packed_attention",
    "flash_packed_attention",
    "get_packed_attention_interface",
    "sdpa_packed_attention",
    # rotary embedding, CPU block schedule, modules, the base model (this module)
    "AttentionContext",
    "PackedEncoder",
    "PackedEncoderLayer",
    "PackedPatchEmbedding",
    "PackedPreTrainedModel",
    "PackedSelfAttention",
    "apply_rotary_pos_emb",
    "cpu_block_tokens",
    "fused_linear",
    "linear",
    "final_norm_in_input_order",
    "has_hooks",
    "per_image_groups",
    "restore_encoder_outputs",
    "rotate_half",
    "segment_mean",
]
