#!/usr/bin/env python
"""Encode images with the SigLIP2 NaViT vision tower and print what each image costs.

    python scripts/encode.py examples/*.jpg examples/*.png [--model DIR] [--max-pixels N] [--max-tokens N]
        [--attn sdpa|eager|flash_attention_2] [--dtype fp32|bf16|fp16] [--device cuda] [--out features.safetensors]

* Loads the image processor and the model from `--model` (default: this repository) through the Auto API with
  `trust_remote_code=True`. A folder without safetensors weights is run with randomly initialised weights (seeded,
  announced loudly), so the demo works on a fresh clone.
* Images are streamed through the model in batches whose patch count stays within `--max-tokens`
  (`pack_by_token_budget`), with a progress bar.
* Prints one row per image (file, original and resized size as width x height, grid (t, h, w), patches, merged
  tokens), then totals, wall time and throughput.
* `--out features.safetensors` saves, per image, `<name>` = `last_hidden_state` rows `[patches, hidden]` and
  `<name>.grid_thws` `[1, 3]` (name = file stem, made unique), written atomically.
* Scale-out: `accelerate launch --num_processes K scripts/encode.py ...` or `torchrun --nproc_per_node K ...`
  splits the file list with accelerate's `PartialState.split_between_processes`; each process writes
  `<out stem>.rank<i>.safetensors` and the main process writes `<out>.index.json`
  (`{"metadata": ..., "weight_map": {tensor name: shard file}}`, the Hugging Face sharded-checkpoint layout).
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _import_helpers():
    """pack_by_token_budget / open_image from the installed package, or from the repository on a fresh clone."""
    try:
        from siglip2_navit.image_processing_siglip2_navit import open_image, pack_by_token_budget
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        from image_processing_siglip2_navit import open_image, pack_by_token_budget  # noqa: E402
    return open_image, pack_by_token_budget


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("files", nargs="+", help="image files")
    parser.add_argument("--model", default=str(REPO_ROOT), help="model folder (default: this repository)")
    parser.add_argument("--min-pixels", type=int, default=None, help="per-image lower pixel budget (default: processor's)")
    parser.add_argument("--max-pixels", type=int, default=None, help="per-image upper pixel budget (default: processor's)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="patch (ViT token) budget per batch (default 16384)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"], help="attention backend")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model dtype (default fp32)")
    parser.add_argument("--device", default=None, help="device (default: the process's accelerator, else cpu)")
    parser.add_argument("--out", default=None, help="write features to this .safetensors file (shards when distributed)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random initialisation (folders without weights)")
    parser.add_argument(
        "--config-overrides",
        default=None,
        help="comma-separated key=value config changes for a randomly initialised model, e.g. "
        "'hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128' (tests, quick demos)",
    )
    args = parser.parse_args(argv)
    if args.max_tokens <= 0:
        parser.error(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.out is not None and not args.out.endswith(".safetensors"):
        parser.error(f"--out must end with .safetensors, got {args.out!r}")
    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:
        parser.error(f"no such file(s): {', '.join(missing)}")
    return args


def parse_overrides(text: Optional[str]) -> Dict[str, Any]:
    overrides: Dict[str, Any] = {}
    if not text:
        return overrides
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise SystemExit(f"--config-overrides: expected key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def unique_names(files: List[str]) -> List[str]:
    """Tensor names from file stems (safe characters only). A stem shared by several files gets the file index
    appended, and any name still taken (e.g. by another file's stem "a_1") gets a further suffix: never two alike."""
    stems = [re.sub(r"[^A-Za-z0-9_\-]", "_", Path(f).stem) or "image" for f in files]
    counts: Dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    wanted = [s if counts[s] == 1 else f"{s}_{i}" for i, s in enumerate(stems)]
    taken = {name for name, stem in zip(wanted, stems) if counts[stem] == 1}  # unique stems keep their name
    names = []
    for name, stem in zip(wanted, stems):
        if counts[stem] > 1:
            base, suffix = name, 1
            while name in taken:
                name, suffix = f"{base}_{suffix}", suffix + 1
            taken.add(name)
        names.append(name)
    return names


def has_weights(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, name)) for name in WEIGHT_FILES)


def header_size(path: str) -> Tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the file header."""
    import PIL.Image

    with PIL.Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_model(args: argparse.Namespace, device: str, is_main: bool):
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel

    dtype = getattr(torch, DTYPES[args.dtype])
    overrides = parse_overrides(args.config_overrides)
    # `dtype` replaced `torch_dtype` in transformers 4.56.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    if has_weights(args.model):
        if overrides:
            raise SystemExit("--config-overrides only applies to randomly initialised models; the folder has weights.")
        model = AutoModel.from_pretrained(
            args.model, trust_remote_code=True, attn_implementation=args.attn, use_safetensors=True, **{dtype_kw: dtype}
        )
        source = "pretrained weights"
    else:
        if is_main:
            bar = "!" * 100
            print(
                f"{bar}\n!! WARNING: no weights in {args.model} (looked for {' / '.join(WEIGHT_FILES)}).\n"
                f"!! Running with RANDOMLY INITIALISED weights (seed {args.seed}): shapes, token counts and speed "
                f"are real, the features are not.\n!! Point --model at a converted checkpoint for real features.\n{bar}",
                file=sys.stderr,
                flush=True,
            )
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=True)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise SystemExit(f"--config-overrides: the config has no field {key!r}")
            setattr(config, key, value)
        torch.manual_seed(args.seed)
        model = AutoModel.from_config(config, trust_remote_code=True, attn_implementation=args.attn)
        model = model.to(dtype)
        source = f"random init (seed {args.seed})"
    return model.to(device).eval(), source


def save_atomic(tensors: Dict[str, Any], path: str, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(content: Dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def format_table(rows: List[Dict[str, Any]]) -> str:
    headers = ["file", "original (WxH)", "resized (WxH)", "grid (t,h,w)", "patches", "tokens"]
    body = [
        [
            r["file"],
            f"{r['orig'][0]}x{r['orig'][1]}",
            f"{r['resized'][0]}x{r['resized'][1]}",
            "({},{},{})".format(*r["grid"]),
            str(r["patches"]),
            str(r["tokens"]),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    align = ["<", ">", ">", ">", ">", ">"]
    line = lambda cells: "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor

    open_image, pack_by_token_budget = _import_helpers()

    state = PartialState(cpu=not torch.cuda.is_available())
    distributed = state.num_processes > 1
    device = args.device or (str(state.device) if state.device.type != "mps" else "cpu")
    if distributed and state.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))

    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
    model, source = load_model(args, device, state.is_main_process)
    config = model.config
    for key in ("patch_size", "temporal_patch_size", "hidden_stride"):
        if getattr(processor, key) != getattr(config, key):
            raise SystemExit(
                f"processor {key}={getattr(processor, key)} disagrees with the model config {key}={getattr(config, key)}"
            )
    budget = {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels}

    names = unique_names(args.files)
    with state.split_between_processes(list(zip(args.files, names))) as my_items:
        my_items = list(my_items)

    # Plan: sizes from the file headers only, then token-bounded batches.
    rows: List[Dict[str, Any]] = []
    for path, name in my_items:
        width, height = header_size(path)
        resized_h, resized_w = processor.smart_resize(height, width, **budget)
        count = processor.get_num_tokens(height, width, **budget)
        grid = (1, resized_h // processor.patch_size, resized_w // processor.patch_size)
        rows.append(
            dict(file=path, name=name, orig=(width, height), resized=(resized_w, resized_h), grid=grid,
                 patches=count.num_patches, tokens=count.num_tokens)
        )
    groups = pack_by_token_budget([r["patches"] for r in rows], args.max_tokens)

    state.wait_for_everyone()
    start = time.perf_counter()
    features: Dict[str, torch.Tensor] = {}
    progress = tqdm(total=len(rows), desc="encoding", unit="img", disable=not state.is_main_process, file=sys.stderr)
    with torch.inference_mode():
        for group in groups:
            images = [open_image(rows[i]["file"]) for i in group]
            batch = processor(images=images, return_tensors="pt", **budget)
            grids = batch["grid_thws"]
            for i, grid in zip(group, grids.tolist()):
                if tuple(grid) != rows[i]["grid"]:
                    raise RuntimeError(f"{rows[i]['file']}: planned grid {rows[i]['grid']} but processed {grid}")
            out = model(batch["pixel_values"].to(device), grids).last_hidden_state
            if args.out is not None:
                for i, chunk in zip(group, torch.split(out, [rows[i]["patches"] for i in group])):
                    features[rows[i]["name"]] = chunk.detach().to("cpu").contiguous()
                    features[rows[i]["name"] + ".grid_thws"] = torch.tensor([rows[i]["grid"]], dtype=torch.int64)
            progress.update(len(group))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    progress.close()

    shard_path = None
    if args.out is not None and features:
        metadata = {
            "format": "pt",
            "model": os.path.abspath(args.model),
            "weights": source,
            "hidden_size": str(config.hidden_size),
            "names": json.dumps([r["name"] for r in rows]),
            "files": json.dumps([r["file"] for r in rows]),
        }
        if distributed:
            stem = args.out[: -len(".safetensors")]
            shard_path = f"{stem}.rank{state.process_index}.safetensors"
        else:
            shard_path = args.out
        save_atomic(features, shard_path, metadata)

    elapsed = time.perf_counter() - start
    all_rows = gather_object(rows) if distributed else rows
    all_times = gather_object([elapsed]) if distributed else [elapsed]
    all_shards = gather_object([(shard_path, sorted(features))]) if distributed else [(shard_path, sorted(features))]
    state.wait_for_everyone()

    if state.is_main_process:
        wall = max(all_times)
        print(f"model: {args.model} ({source}), attn={args.attn}, dtype={args.dtype}, device={device}, "
              f"processes={state.num_processes}")
        print(format_table(all_rows))
        total_patches = sum(r["patches"] for r in all_rows)
        total_tokens = sum(r["tokens"] for r in all_rows)
        print(f"images: {len(all_rows)}  total patches: {total_patches}  total merged tokens: {total_tokens}")
        print(f"wall time: {wall:.3f} s  throughput: {total_patches / max(wall, 1e-9):.1f} patches/s "
              f"({total_tokens / max(wall, 1e-9):.1f} merged tokens/s)")
        if args.out is not None:
            if distributed:
                index = {
                    "metadata": {"num_processes": state.num_processes, "model": os.path.abspath(args.model),
                                 "weights": source, "hidden_size": config.hidden_size},
                    "weight_map": {
                        name: os.path.basename(path) for path, names_ in all_shards if path for name in names_
                    },
                }
                index_path = f"{args.out}.index.json"
                write_json_atomic(index, index_path)
                shards = sorted({os.path.basename(p) for p, _ in all_shards if p})
                print(f"saved {len(index['weight_map'])} tensors in {len(shards)} shards ({', '.join(shards)}); "
                      f"index: {index_path}")
            else:
                print(f"saved {len(features)} tensors to {args.out}")
    state.wait_for_everyone()
    if distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
