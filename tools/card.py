# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The model card (`README.md`) of a converted folder, generated from the folder itself.

Everything the card states comes from the folder's config and processor settings: the family and source, the real
sizes, the preprocessing rule, what the outputs mean for that family, and the values its code prints (computed with
the processor's planning API on the folder's own `examples/` images). Its Python blocks run from inside the folder
with `"path/or/hub-id"` replaced by the folder's path or Hub id; the only commands it names are the console commands
of the installed `siglip2-navit` package.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import PIL.Image

from .families import MODEL_CARD


EXAMPLES = ("examples/chelsea.png", "examples/rocket.jpg")  # the images the card's code opens (shipped in examples/)
PICTURE_DIR = "pictures"  # where the converter puts the pictures of EXAMPLES[0]


# ----------------------------------------------------------------------------------------------------------------------
# what the folder is
# ----------------------------------------------------------------------------------------------------------------------


def family_name(config: Any) -> str:
    """Human name of the encoder family and variant of `config`."""
    if config.model_type == "aimv2_navit":
        return "AIMv2 (native resolution)" if config.is_native else f"AIMv2 ({config.image_size}-px position table)"
    if config.model_type == "dinov3_navit":
        return "DINOv3 ViT"
    if config.vision_use_head and not config.use_rope:
        return "SigLIP2 naflex"
    return "SigLIP2 (Ovis2.5 vision tower)" if config.use_rope else "SigLIP2"


def _head(config: Any) -> str:
    if config.model_type == "aimv2_navit":
        return "attention pooling (a learned query over all tokens)" if config.use_head else "none"
    if config.model_type == "dinov3_navit":
        return "CLS token (no extra head)"
    return "MAP (multi-head attention pooling probe)" if config.vision_use_head else "none"


def _positions(config: Any) -> str:
    if config.model_type == "aimv2_navit":
        if config.is_native:
            return "2D sin-cos embedding computed for each grid"
        side = config.image_size // config.patch_size
        return f"learned {side}×{side} table: only a {side}×{side} patch grid ({config.image_size} px) is accepted"
    if config.model_type == "dinov3_navit":
        return f"2D RoPE on patch coordinates (θ = {config.rope_theta:g})"
    side = config.image_size // config.patch_size
    parts = []
    if config.preserve_original_pe:
        antialias = ", antialiased" if config.pe_antialias else ""
        parts.append(f"learned {side}×{side} embedding resized {config.pe_interpolation}{antialias} to each grid")
    if config.use_rope:
        parts.append("2D RoPE")
    return " + ".join(parts) or "none"


def architecture_rows(config: Any) -> List[Tuple[str, str]]:
    """`(field, value)` rows of the card's size table."""
    stride = config.hidden_stride
    rows = [
        ("family", family_name(config)),
        ("width (hidden size)", str(config.hidden_size)),
        ("layers", str(config.num_hidden_layers)),
        ("attention heads", str(config.num_attention_heads)),
        ("MLP width", str(config.intermediate_size)),
        ("patch", f"{config.patch_size}×{config.patch_size} px, {getattr(config, 'temporal_patch_size', 1)} frame(s)"),
    ]
    if config.model_type == "dinov3_navit":
        rows.append(("register tokens", str(config.num_register_tokens)))
    full = getattr(config, "fullatt_block_indexes", None)
    if config.model_type == "siglip2_navit" and full is not None:
        rows.append(("attention", f"windows of {config.window_size} px; whole image in layers {full}"))
    else:
        rows.append(("attention", "whole image (each frame) in every layer"))
    rows += [
        ("pooling head", _head(config)),
        ("positions", _positions(config)),
        ("token order", "raster" if stride == 1 else f"{stride}×{stride} blocks (for an LLM-side merger)"),
    ]
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# preprocessing and outputs
# ----------------------------------------------------------------------------------------------------------------------


def _normalisation(processor: Any) -> str:
    import PIL.Image as Image

    resample = Image.Resampling(processor.resample).name.lower()
    mean = ", ".join(f"{v:g}" for v in processor.image_mean)
    std = ", ".join(f"{v:g}" for v in processor.image_std)
    return f"resampled {resample} (PIL), rescaled to [0, 1] and normalised with mean ({mean}) and std ({std})"


def preprocessing_text(config: Any, processor: Any) -> str:
    """The folder processor's rule, in words, with its settings."""
    p, factor = processor.patch_size, processor.patch_size * processor.hidden_stride
    rule = processor.resize_rule
    if rule == "naflex":
        text = (
            f"Each image keeps its aspect ratio and is resized to the largest grid of at most "
            f"**{processor.max_num_patches} patches** of {p} px, sides rounded up to whole patches — SigLIP2 naflex's "
            f"rule, the grid transformers' `Siglip2ImageProcessor` gives (`spatial_shapes`). Change the budget per "
            f"call with `processor(images, max_num_patches=1024)`."
        )
        if processor.hidden_stride > 1:
            s = processor.hidden_stride
            text += (
                f" With this folder's `hidden_stride` {s}, the rule runs on {s}×{s} blocks of patches (cells of "
                f"{factor} px, at most {processor.max_num_patches // s**2} cells), so both grid sides are even and "
                f"grids can differ from naflex's."
            )
    elif rule == "center_crop":
        crop_h, crop_w = processor.crop_size
        text = (
            f"Fixed size, as the source's CLIP-style processor: the short side is resized to "
            f"**{processor.shortest_edge} px** and the centred **{crop_h}×{crop_w}** window is kept "
            f"(a {crop_h // p}×{crop_w // p} patch grid, the only one this checkpoint's position table accepts)."
        )
    else:
        text = (
            f"Each image keeps its aspect ratio and is resized so both sides are multiples of {factor} px and its "
            f"area lies in [{processor.min_pixels:,}, {processor.max_pixels:,}] pixels (Ovis2.5's `smart_resize`; "
            f"per call: `min_pixels=`, `max_pixels=`)."
        )
    text += f" Pixels are {_normalisation(processor)}."
    if config.model_type == "dinov3_navit" and rule != "center_crop":
        text += (
            " The source's own processor squeezes every image to 224×224; this folder keeps each image's aspect ratio "
            "and native resolution (RoPE handles any grid), so features differ from the 224×224 pipeline wherever "
            "that resize would distort or shrink the image. For the source's behaviour, resize to 224×224 yourself "
            "and pass `do_resize=False`."
        )
    return text


def outputs_text(config: Any) -> str:
    """What the model's outputs mean for this family (markdown bullets)."""
    if config.model_type == "dinov3_navit":
        return (
            "- `last_hidden_state` `[Σ h·w, hidden]`: the patch tokens of every image, after the final norm, images "
            "back to back.\n"
            "- `pooler_output` `[frames, hidden]`: each frame's CLS token after the final norm (one per image).\n"
            f"- `prefix_tokens` `[frames, {1 + config.num_register_tokens}, hidden]`: the CLS token and the "
            f"{config.num_register_tokens} register tokens of each frame.\n"
            "- `hidden_states` (with `output_hidden_states=True`) and `attentions` (eager backend, "
            "`output_attentions=True`; tokens ordered CLS, registers, patches)."
        )
    norm = "final RMSNorm" if config.model_type == "aimv2_navit" else "`post_layernorm`"
    has_head = config.use_head if config.model_type == "aimv2_navit" else config.vision_use_head
    pooled = (
        f"- `pooler_output` `[images, hidden]`: the {_head(config)} over each image's tokens.\n"
        if has_head
        else "- `pooler_output` is `None` (no pooling head); the pipeline's `pool=True` gives the tokens' mean.\n"
    )
    return (
        f"- `last_hidden_state` `[Σ t·h·w, hidden]`: every patch token after the {norm}, images back to back in "
        "their `grid_thws` order.\n"
        + pooled
        + "- `hidden_states` (with `output_hidden_states=True`: embeddings and every layer, before the final norm) and "
        "`attentions` (eager backend, `output_attentions=True`)."
    )


# ----------------------------------------------------------------------------------------------------------------------
# the code blocks and the values they print
# ----------------------------------------------------------------------------------------------------------------------


def example_grids(processor: Any, example_sizes: Sequence[Tuple[int, int]]) -> List[List[int]]:
    """`[1, h, w]` of each example image (`(width, height)` sizes), from the processor's planning API."""
    grids = []
    for width, height in example_sizes:
        target_h, target_w = processor.target_size(height, width)
        grids.append([1, target_h // processor.patch_size, target_w // processor.patch_size])
    return grids


def quick_start(config: Any, processor: Any, example_sizes: Sequence[Tuple[int, int]]) -> str:
    """The quick-start block: each `print` line ends with the exact line it prints for this folder."""
    grids = example_grids(processor, example_sizes)
    tokens = sum(t * h * w for t, h, w in grids)
    hidden = config.hidden_size
    has_pooled = config.model_type == "dinov3_navit" or (
        config.use_head if config.model_type == "aimv2_navit" else config.vision_use_head
    )
    opened = ", ".join(f'Image.open("{name}")' for name in EXAMPLES)
    lines = [
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModel",
        "",
        'processor = AutoImageProcessor.from_pretrained("path/or/hub-id", trust_remote_code=True)',
        'model = AutoModel.from_pretrained("path/or/hub-id", trust_remote_code=True).eval()',
        "",
        f"inputs = processor(images=[{opened}], return_tensors=\"pt\")",
        f'print(inputs["grid_thws"].tolist())  # {grids}',
        "with torch.no_grad():",
        "    out = model(**inputs)",
        f"print(tuple(out.last_hidden_state.shape))  # {(tokens, hidden)}",
        f"print(None if out.pooler_output is None else tuple(out.pooler_output.shape))  # "
        f"{(len(grids), hidden) if has_pooled else None}",
    ]
    if config.model_type == "dinov3_navit":
        lines.append(
            f"print(tuple(out.prefix_tokens.shape))  # {(len(grids), 1 + config.num_register_tokens, hidden)}"
        )
    return "\n".join(lines)


def pipeline_block(config: Any, processor: Any, example_sizes: Sequence[Tuple[int, int]]) -> str:
    grids = example_grids(processor, example_sizes)
    shapes = [(1, t * h * w, config.hidden_size) for t, h, w in grids]
    files = ", ".join(f'"{name}"' for name in EXAMPLES)
    return "\n".join(
        [
            "from transformers import pipeline",
            "",
            'extractor = pipeline("image-feature-extraction", model="path/or/hub-id", trust_remote_code=True)',
            f"features = extractor([{files}], batch_size=2, return_tensors=True)  # one packed forward",
            f"print([tuple(f.shape) for f in features])  # {shapes}",
            f"pooled = extractor([{files}], pool=True, return_tensors=True)",
            f"print([tuple(p.shape) for p in pooled])  # {[(1, config.hidden_size)] * len(grids)}",
        ]
    )


def merge_block(config: Any, processor: Any, example_sizes: Sequence[Tuple[int, int]]) -> str:
    """Ovis-style merging of s×s blocks into LLM tokens (folders with hidden_stride > 1)."""
    s = config.hidden_stride
    _, h, w = example_grids(processor, example_sizes[:1])[0]
    return "\n".join(
        [
            "import torch",
            "from transformers import AutoImageProcessor, AutoModel",
            "",
            'processor = AutoImageProcessor.from_pretrained("path/or/hub-id", trust_remote_code=True)',
            'model = AutoModel.from_pretrained("path/or/hub-id", trust_remote_code=True).eval()',
            f'inputs = processor(images="{EXAMPLES[0]}", return_tensors="pt")',
            "with torch.no_grad():",
            "    features = model(**inputs, output_hidden_states=True).hidden_states[-1]  # [h·w, hidden], pre-norm",
            "s = model.config.hidden_stride",
            "merged = features.reshape(-1, s * s * features.shape[-1])  # one row per s×s block = one LLM token",
            f"print(tuple(merged.shape))  # {(h * w // (s * s), s * s * config.hidden_size)}",
        ]
    )


# ----------------------------------------------------------------------------------------------------------------------
# the card
# ----------------------------------------------------------------------------------------------------------------------


def _front_matter(config: Any, base_model: Optional[str]) -> str:
    tags = {"siglip2_navit": "siglip2", "aimv2_navit": "aimv2", "dinov3_navit": "dinov3"}[config.model_type]
    lines = ["---"] + ([f"base_model: {base_model}"] if base_model else [])
    lines += ["library_name: transformers", "pipeline_tag: image-feature-extraction", "license: other"]
    lines += ["tags:", f"  - {tags}", "  - navit", "  - vision", "  - image-feature-extraction", "  - native-resolution"]
    return "\n".join(lines + ["---"])


def _limitations(config: Any, processor: Any) -> List[str]:
    notes = []
    if config.model_type != "dinov3_navit":  # the other two families were trained with a text tower
        notes.append("- Vision tower only: no text tower, so no zero-shot classification or image-text similarity.")
    if config.model_type == "aimv2_navit" and not config.is_native:
        side = config.image_size // config.patch_size
        notes.append(
            f"- The learned position table covers a {side}×{side} grid only: with `do_resize=False` or another "
            f"`resize_rule`, any other grid is refused with a `ValueError`."
        )
    if config.hidden_stride > 1:
        notes.append(
            f"- Grids must have sides divisible by {config.hidden_stride} (`hidden_stride`); this folder's processor "
            "guarantees it."
        )
    notes.append("- `flash_attention_2` needs a CUDA GPU and fp16/bf16; `sdpa` (default) and `eager` run anywhere.")
    return notes


def model_card(
    config: Any,
    processor: Any,
    example_sizes: Sequence[Tuple[int, int]],
    base_model: Optional[str] = None,
    source: Optional[str] = None,
    command: Optional[str] = None,
    pictures: Sequence[str] = (),
) -> str:
    """The card's markdown. `example_sizes`: `(width, height)` of `EXAMPLES`; `source`: where the weights came
    from (markdown); `command`: the console command that converted them; `pictures`: folder-relative paths of the
    pictures of `EXAMPLES[0]`."""
    title = family_name(config)
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else source
    if origin and command:
        made = f"Weights converted from {origin} with `{command}` (the `siglip2-navit` package)."
    else:
        made = "Written with the `siglip2-navit` package" + (f" from {origin}." if origin else ".")
    table = "\n".join(f"| {name} | {value} |" for name, value in architecture_rows(config))
    parts = [
        _front_matter(config, base_model),
        f"# {title} — packed (NaViT) vision encoder",
        f"{made} The encoder takes images of any size and aspect ratio, packs them into one sequence (each image "
        "attends only to itself) and returns one feature per patch. Load it with `trust_remote_code=True`; the code "
        "is in this folder.",
    ]
    if pictures:
        images = " ".join(f"![{Path(p).stem}]({p})" for p in pictures)
        parts.append(
            f"{images}\n\n*`{EXAMPLES[0]}` as this model sees it: patch features projected on their first three "
            "principal components (one per RGB channel; similar parts, similar colours)"
            + (", and where the pooling query / CLS token attends." if len(pictures) > 1 else ".")
            + "*"
        )
    parts += [
        "## Model\n\n| | |\n|---|---|\n" + table,
        "## Preprocessing\n\n" + preprocessing_text(config, processor),
        "## Usage\n\nRun from this folder (the images are in `examples/`), with `\"path/or/hub-id\"` replaced by "
        "the folder's path or Hub id. Each `print` shows, in its comment, what it prints for this model.",
        "```python\n" + quick_start(config, processor, example_sizes) + "\n```",
        "Outputs:\n\n" + outputs_text(config),
        "Per-image features with transformers' `pipeline` (one packed forward per batch):",
        "```python\n" + pipeline_block(config, processor, example_sizes) + "\n```",
    ]
    if config.hidden_stride > 1:
        parts += [
            f"Tokens come in {config.hidden_stride}×{config.hidden_stride} blocks, so an LLM-side merger is a "
            "plain reshape:",
            "```python\n" + merge_block(config, processor, example_sizes) + "\n```",
        ]
    parts += [
        "## Command line\n\nWith the `siglip2-navit` package installed:",
        "```bash\n"
        f"navit-visualize {' '.join(EXAMPLES)} --model path/or/hub-id --out pictures/  # feature and attention PNGs\n"
        "navit-encode photos/ --out features/ --model path/or/hub-id  # a folder of images to safetensors shards\n"
        "```",
        "## Limitations\n\n" + "\n".join(_limitations(config, processor)),
    ]
    return "\n\n".join(parts) + "\n"


def draw_pictures(folder: Path, model: Any, processor: Any) -> List[Path]:
    """The pictures the card shows: `EXAMPLES[0]` of `folder` through `model` (see `tools.visualize`), written to
    `folder/PICTURE_DIR`."""
    from .visualize import picture_budget, save_pictures, visualize

    folder = Path(folder)
    (pictures,) = visualize(model, processor, images=[folder / EXAMPLES[0]], **picture_budget(processor))
    return save_pictures(pictures, folder / PICTURE_DIR, Path(EXAMPLES[0]).stem)


def write_card(
    folder: Path,
    config: Any,
    processor: Any,
    base_model: Optional[str] = None,
    source: Optional[str] = None,
    command: Optional[str] = None,
) -> Path:
    """Write `folder/README.md` for the converted folder (its `examples/` and `pictures/` already written)."""
    folder = Path(folder)
    sizes = []
    for name in EXAMPLES:
        with PIL.Image.open(folder / name) as image:
            sizes.append(image.size)
    pictures = sorted(
        (path.relative_to(folder).as_posix() for path in (folder / PICTURE_DIR).glob("*.png")),
        key=lambda name: (".attention." in name, name),  # features first
    )
    path = folder / MODEL_CARD
    path.write_text(model_card(config, processor, sizes, base_model, source, command, pictures), encoding="utf-8")
    return path
