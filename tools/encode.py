"""Encode images with a packed (NaViT) vision tower: streaming, sharded, resumable, fault-tolerant.

    navit-encode INPUT... [--out DIR] [--model M] [--format safetensors|parquet]
        [--features tokens|pooled] [--pool auto|head|mean] [--normalize] [--shard-size N] [--workers N]
        [--max-tokens N] [--min-pixels N] [--max-pixels N] [--dtype auto|fp32|bf16|fp16] [--attn sdpa|eager|...]
        [--device cuda] [--cpu-allocator retain|default]
        [--dataset PATH [--image-column image] [--id-column NAME] [--split S]] [--meta]
        [--strict] [--overwrite] [--retry-errors] [--config-overrides k=v,...] [--table | --no-table]
        [--engine local|ray [--ray-actors N] [--ray-gpus-per-actor G] [--ray-cpus-per-actor C]]

INPUT: image files (id = the path as given), folders (walked recursively for image files, sorted; id = the path
relative to the folder), quoted globs (id = each match as written by the glob) and `@list.txt` (one INPUT per line;
relative paths are relative to the current directory). WebDataset `.tar` shards (given, matched, found in a folder,
or any URL fsspec opens, e.g. `s3://bucket/laion/*.tar`) are read without
extracting them: one input per sample, id = `<shard file name without .tar>/<key>` (a shard found in a folder: its
relative path without .tar); a sample without an image member, or with a corrupt one, is an error under that id;
`--meta` stores each sample's `.json` member as a `meta` string (null when it has none). `--dataset PATH`: a local
Hugging Face `datasets` dataset (a `save_to_disk` folder, or parquet file(s) / a folder of parquet files) with an
image column; id = the row index, or the value of `--id-column`. Ids must be unique (a clash is refused, never
renamed); bytes of a file name that are not UTF-8 appear in its id as backslash escapes (`caf\\xe9.png`). A `**`
glob does not descend through symlinks to folders.

Without `--out` nothing is written: the images are encoded and a table of what each costs is printed (the demo).
With `--out DIR`, every `--shard-size` images of a process become one shard `DIR/train-r<rank>-<seq>.<ext>`,
written to a temporary name, fsynced and renamed: the ids in complete shards are the done set, so rerunning the
same command after a crash or a kill encodes exactly the rest. `DIR/_manifest.json` fingerprints the settings that
change the features (model config and weights, processor settings, features, pool, normalize, format, dtype);
a rerun with other settings is refused (`--overwrite` starts over). A safetensors shard holds the sha256 of its
content in its metadata (`sha256`), a parquet shard page checksums: a rerun verifies every shard first and encodes
the images of a corrupt one again. Unreadable inputs, inputs that are not regular files (FIFOs, devices: never
opened) and images whose features come out NaN/Inf (never stored) are recorded in `DIR/errors.jsonl`
(`{"id", "error", "source"}` per line) and skipped; the run goes on (`--strict`: exit status 1 when any input has
an error record). A model that gives NaN/Inf for every image of its first batch is broken: the job stops there,
recording nothing. A failure of the job itself (disk full, a dead worker) is one line with exit status 1; complete
shards are kept and the same command resumes. Under `torchrun` / `accelerate launch` each rank takes the ids whose
stable hash falls to it and writes its own shards; any world size resumes any other's output.

`--engine ray` runs the same job on Ray Data (pip install "siglip2-navit[ray]"): Ray tasks decode and preprocess,
a pool of `--ray-actors` actors (each loading the model once, `--ray-gpus-per-actor` / `--ray-cpus-per-actor`)
encodes in batches packed to `--max-tokens`, and this process writes DIR exactly as the local engine does (same
shards, ids, manifest and errors.jsonl: either engine resumes the other's output). A killed actor is restarted and
its batches retried. It connects to the cluster at RAY_ADDRESS when set, else starts a local one.

On a CPU (each Ray actor on its own), glibc malloc is set to keep freed memory for the next forward
(`--cpu-allocator retain`, the default; tools/cpu_allocator.py): a forward then page-faults nothing in again, at the
cost of the process keeping its peak heap; `--cpu-allocator default` leaves glibc's settings alone.

Loads the processor and model through the Auto API with `trust_remote_code=True`; a folder without safetensors
weights runs randomly initialised weights (seeded, announced loudly).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .cpu_allocator import CPU_ALLOCATOR_CHOICES, apply_cpu_job_memory_settings
from .dtypes import DTYPES, resolve_dtype
from .encode_inputs import (  # noqa: F401  (glob_matches, expand_input, ...: this module's API, as before the cut)
    EncodeInputs,
    Item,
    JobError,
    TokenBudgetBatches,
    UsageError,
    collate,
    collect_inputs,
    decode_image,
    expand_input,
    glob_matches,
    header_size,
    open_dataset,
    owner_rank,
    quiet_worker_threads,
)
from .encode_output import (
    DEFAULT_SHARD_SIZE,
    ERRORS,
    FORMAT_EXT,
    MANIFEST_VERSION,
    ShardSink,
    done_ids,
    maybe_kill,
    prepare_output,
    release_locks,
)


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # a loadable model folder itself: its config.json, random weights
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
SHOWN_ERRORS = 20  # bad inputs named in the summary (all of them are in DIR/errors.jsonl)



# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.split("\n\n")  # title, usage (argparse writes its own), then the behaviour: the epilog
    parser = argparse.ArgumentParser(description=paragraphs[0], epilog="\n\n".join(paragraphs[2:]),
                                     formatter_class=argparse.RawTextHelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="*", metavar="INPUT", help="image files, folders, quoted globs, @list.txt")
    add("--dataset", default=None, help="a local datasets folder (save_to_disk) or parquet file(s)/folder")
    add("--image-column", default="image", help="image column of --dataset (default: image)")
    add("--id-column", default=None, help="column of --dataset holding the ids (default: ids are row numbers)")
    add("--meta", action="store_true", help="WebDataset inputs: store each sample's .json as a `meta` string")
    add("--split", default=None, help="split of a saved DatasetDict (default: its only split, or 'train')")
    add("--out", default=None, help="output folder (without it: encode and print the table, write nothing)")
    add("--model", default=str(PACKAGE_DIR), help="model folder or Hub id (default: the package's own SigLIP2 config, random weights)")
    add("--format", default="safetensors", choices=sorted(FORMAT_EXT), help="shard format (default safetensors)")
    add("--features", default="tokens", choices=["tokens", "pooled"],
        help="tokens: last_hidden_state rows per image; pooled: one embedding per image (default tokens)")
    add("--pool", default="auto", choices=["auto", "head", "mean"],
        help="pooled features: head = the model's pooler_output, mean = mean of the tokens, "
        "auto = head when the model has one (default)")
    add("--normalize", action="store_true", help="L2-normalise pooled embeddings")
    add("--shard-size", type=int, default=None,
        help=f"images per shard (default {DEFAULT_SHARD_SIZE['tokens']} for tokens, "
        f"{DEFAULT_SHARD_SIZE['pooled']} for pooled)")
    add("--workers", type=int, default=0, help="DataLoader worker processes that decode and preprocess (default 0)")
    add("--max-tokens", type=int, default=16384, help="patch (ViT token) budget per batch (default 16384)")
    add("--min-pixels", type=int, default=None, help="per-image lower pixel budget (default: processor's)")
    add("--max-pixels", type=int, default=None, help="per-image upper pixel budget (default: processor's)")
    add("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
        help="model dtype; auto (default): bf16 on a CUDA GPU or a CPU with native bf16 matmuls (AVX512-BF16/AMX), "
        "fp32 elsewhere")
    add("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"], help="attention backend")
    add("--device", default=None, help="device (default: cuda:<LOCAL_RANK> when CUDA is available, else cpu)")
    add("--cpu-allocator", default="retain", choices=CPU_ALLOCATOR_CHOICES,
        help="on CPU, retain (default): glibc malloc keeps freed memory for the next forward (no page faults; the "
        "process keeps its peak heap); default: glibc's own settings")
    add("--strict", action="store_true", help="exit with status 1 when any input could not be encoded")
    add("--overwrite", action="store_true", help="delete this tool's files in --out first and start over")
    add("--retry-errors", action="store_true", help="forget DIR/errors.jsonl and try those inputs again")
    add("--table", action=argparse.BooleanOptionalAction, default=None,
        help="print one row per image (default: only without --out)")
    add("--seed", type=int, default=0, help="seed for random initialisation (folders without weights)")
    add("--engine", default="local", choices=["local", "ray"],
        help="local: this machine (torchrun for several processes); ray: Ray Data, RAY_ADDRESS or a local cluster")
    add("--ray-actors", type=int, default=None,
        help="encoder actors (default: the cluster's GPUs / --ray-gpus-per-actor, or 1 without GPUs)")
    add("--ray-gpus-per-actor", type=float, default=None, help="GPUs per actor (default 1 when the cluster has GPUs)")
    add("--ray-cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)")
    add("--config-overrides", default=None,
        help="comma-separated key=value config changes for a randomly initialised model, e.g. "
        "'hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128' (tests, quick demos)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before anything is loaded."""
    for name in ("max_tokens", "shard_size", "min_pixels", "max_pixels"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if not args.inputs and args.dataset is None:
        raise UsageError("no input: give image files, folders, globs, @list.txt or --dataset PATH")
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model!r} is not a folder (expected a converted model folder)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--model {args.model!r} has no config.json (expected a converted model folder)")
    if args.out is not None:
        if args.out.endswith((".safetensors", ".parquet")):
            raise UsageError(f"--out is an output folder, got a file name {args.out!r}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out!r} exists and is not a folder")
    if args.features == "tokens" and (args.pool != "auto" or args.normalize):
        raise UsageError("--pool and --normalize apply to --features pooled only")
    if args.format == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UsageError('--format parquet needs pyarrow: pip install "siglip2-navit[encode]"') from None
    if args.out is None and (args.overwrite or args.retry_errors):
        raise UsageError("--overwrite and --retry-errors need --out")
    if args.id_column is not None and args.dataset is None:
        raise UsageError("--id-column applies to --dataset only")
    if args.engine == "ray":
        from .encode_ray import check_ray_args

        check_ray_args(args)
    elif any(getattr(args, name) is not None for name in ("ray_actors", "ray_gpus_per_actor")):
        raise UsageError("--ray-actors and --ray-gpus-per-actor apply to --engine ray only")


def parse_overrides(text: Optional[str]) -> Dict[str, Any]:
    overrides: Dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise UsageError(f"--config-overrides: expected key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


# ----------------------------------------------------------------------------------------------------------------------
# model, settings fingerprint, distributed setup
# ----------------------------------------------------------------------------------------------------------------------


def has_weights(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, name)) for name in WEIGHT_FILES)


def load_config(args: argparse.Namespace):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model, trust_remote_code=True)
    overrides = parse_overrides(args.config_overrides)
    if overrides and has_weights(args.model):
        raise UsageError("--config-overrides only applies to randomly initialised models; the folder has weights")
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UsageError(f"--config-overrides: the config has no field {key!r}")
        setattr(config, key, value)
    return config


def load_processor(model: str) -> Any:
    """The folder's image processor through `AutoImageProcessor` (remote code). transformers < 4.52 warns that a
    "slow" processor is used when `use_fast` is unset; this processor has no fast variant, so that warning is noise
    in the job's output and is silenced here (nothing else is)."""
    import transformers
    from transformers import AutoImageProcessor

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        return AutoImageProcessor.from_pretrained(model, trust_remote_code=True)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def load_model(args: argparse.Namespace, config: Any, device: str, announce: bool) -> Tuple[Any, str]:
    import torch
    import transformers
    from transformers import AutoModel

    dtype = DTYPES[args.dtype]
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    if has_weights(args.model):
        transformers.utils.logging.disable_progress_bar()  # this job shows its own progress; errors stay one line
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # its load report: check_loading_info says it in one line
        try:
            model, info = AutoModel.from_pretrained(args.model, trust_remote_code=True, attn_implementation=args.attn,
                                                    use_safetensors=True, output_loading_info=True, **{dtype_kw: dtype})
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
        check_loading_info(info, args.model)
        source = "pretrained weights"
    else:
        if announce:
            bar = "!" * 100
            print(f"{bar}\n!! WARNING: no weights in {args.model} (looked for {' / '.join(WEIGHT_FILES)}).\n"
                  f"!! Running with RANDOMLY INITIALISED weights (seed {args.seed}): shapes, token counts and speed "
                  f"are real, the features are not.\n!! Point --model at a converted checkpoint for real features.\n"
                  f"{bar}", file=sys.stderr, flush=True)
        torch.manual_seed(args.seed)
        model = AutoModel.from_config(config, trust_remote_code=True, attn_implementation=args.attn).to(dtype)
        source = f"random init (seed {args.seed})"
    return model.to(device).eval(), source


def check_loading_info(info: Dict[str, Any], model_dir: str) -> None:
    """Weights missing from the files (they would run randomly initialised), left over (dropped) or of another shape
    than config.json says: the folder is damaged or its config was edited; refused before anything is encoded."""
    problems = [f"{len(info[key])} {what} (e.g. {sorted(map(str, info[key]))[0]})"
                for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                                  ("mismatched_keys", "of another shape")) if info.get(key)]
    if problems:
        raise UsageError(f"the weights in {model_dir} do not match its config.json: {', '.join(problems)}; "
                         "reconvert the model or restore its config.json")


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def weights_digest(args: argparse.Namespace) -> str:
    """sha256 over the safetensors weight files (or the seed of a randomly initialised model)."""
    if not has_weights(args.model):
        return f"random init, seed {args.seed}"
    digest = hashlib.sha256()
    for name in sorted(os.listdir(args.model)):
        if name.endswith(".safetensors"):
            with open(os.path.join(args.model, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def make_fingerprint(args: argparse.Namespace, config: Any, processor: Any, pool: Optional[str]) -> Dict[str, Any]:
    """The settings that change the stored features (and, for --dataset, what the row-index ids refer to); a resumed
    run must match them exactly. `pool` is the resolved pooling ('head' / 'mean'), not the --pool request."""
    volatile = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "_attn_implementation_internal",
                "_attn_implementation_autoset", "attn_implementation", "_commit_hash")
    config_dict = {k: v for k, v in config.to_dict().items() if k not in volatile}
    processor_dict = {k: v for k, v in processor.to_dict().items() if not k.startswith("_") and k != "auto_map"}
    return {
        "version": MANIFEST_VERSION,
        "model": os.path.abspath(args.model),
        "config_sha256": sha256_json(config_dict),
        "weights": weights_digest(args),
        "processor_sha256": sha256_json(processor_dict),
        "min_pixels": args.min_pixels,
        "max_pixels": args.max_pixels,
        "features": args.features,
        "pool": pool,
        "normalize": args.normalize,
        "dataset": None if args.dataset is None else [os.path.abspath(args.dataset), args.split, args.image_column]
        + ([args.id_column] if args.id_column is not None else []),
        "format": args.format,
        "dtype": args.dtype,
        **({"meta": True} if args.meta else {}),  # the shards' columns (absent before --meta existed)
    }


@dataclasses.dataclass
class Dist:
    """This process's place in a torchrun / accelerate launch job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dist = cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1:
            import torch.distributed

            torch.distributed.init_process_group(backend="gloo")  # CPU collectives for coordination only
        return dist

    def broadcast(self, value: Any) -> Any:
        if self.world_size == 1:
            return value
        import torch.distributed

        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> List[Any]:
        if self.world_size == 1:
            return [value]
        import torch.distributed

        out: List[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def choose_device(requested: Optional[str], dist: Dist) -> str:
    import torch

    if requested is None:
        return f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available on this machine")
        index = int(requested.split(":")[1]) if ":" in requested else dist.local_rank
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{index}"
    if requested != "cpu":
        raise UsageError(f"--device {requested}: expected cpu, cuda or cuda:N")
    return requested


def on_rank0(dist: Dist, action: Any) -> Any:
    """Run `action()` on rank 0 and share its result; a UsageError there stops every rank with the same message."""
    result: Tuple[Optional[str], Any] = (None, None)
    if dist.rank == 0:
        try:
            result = (None, action())
        except UsageError as error:
            result = (str(error), None)
        except Exception as error:  # noqa: BLE001 - e.g. a permission error: the other ranks must not wait forever
            result = (f"preparing the output folder failed: {type(error).__name__}: {error}", None)
    message, value = dist.broadcast(result)
    if message is not None:
        raise UsageError(message)
    return value


# ----------------------------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------------------------


def check_budget(args: argparse.Namespace, processor: Any) -> None:
    """--min-pixels / --max-pixels must make a valid budget with the processor's defaults (one line, before any work:
    otherwise every image would fail alike)."""
    try:
        processor.smart_resize(64, 64, **budget_of(args))
    except ValueError as error:
        raise UsageError(f"pixel budget: {error}") from None


def resolve_pool(args: argparse.Namespace, model: Any, processor: Any, device: str) -> Optional[str]:
    """'head' or 'mean' for pooled features (auto: head when one tiny forward returns a pooler_output)."""
    import numpy as np
    import PIL.Image
    import torch

    if args.features != "pooled" or args.pool == "mean":
        return None if args.features != "pooled" else "mean"
    probe = processor(images=[PIL.Image.fromarray(np.zeros((64, 64, 3), np.uint8))], return_tensors="pt",
                      **budget_of(args))
    with torch.inference_mode():
        pooled = model(probe["pixel_values"].to(device, model.dtype), probe["grid_thws"]).pooler_output
    if pooled is not None:
        return "head"
    if args.pool == "head":
        raise UsageError("--pool head: this model has no pooling head (its pooler_output is None); use --pool mean")
    return "mean"


def budget_of(args: argparse.Namespace) -> Dict[str, int]:
    return {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}


def per_image_features(output: Any, grids: Any, features: str, pool: Optional[str], normalize: bool) -> List[Any]:
    """Split a packed forward's output into one tensor per image: tokens [patches, D], or pooled [D] ([t, D]
    when the model pools per frame and an image has t > 1 frames)."""
    import torch

    from ..navit_layout import split_per_image

    counts = grids.prod(-1).tolist()
    hidden = output.last_hidden_state
    tokens = split_per_image(hidden, grids)
    if features == "tokens":
        return list(tokens)
    if pool == "mean":
        pooled = [t.float().mean(0).to(hidden.dtype) for t in tokens]
    else:
        head = output.pooler_output
        frames = grids[:, 0].tolist()
        if head.shape[0] == len(counts):
            pooled = list(head)
        elif head.shape[0] == sum(frames):
            pooled = [p[0] if p.shape[0] == 1 else p for p in torch.split(head, frames)]
        else:
            raise RuntimeError(f"pooler_output has {head.shape[0]} rows for {len(counts)} images")
    if normalize:
        pooled = [torch.nn.functional.normalize(p.float(), dim=-1).to(hidden.dtype) for p in pooled]
    return pooled


# ----------------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------------


def format_table(rows: List[Dict[str, Any]]) -> str:
    headers = ["file", "original (WxH)", "resized (WxH)", "grid (t,h,w)", "patches", "tokens"]
    body = [[r["file"], "{}x{}".format(*r["orig"]), "{}x{}".format(*r["resized"]), "({},{},{})".format(*r["grid"]),
             str(r["patches"]), str(r["tokens"])] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(headers)]
    align = ["<", ">", ">", ">", ">", ">"]

    def line(cells: List[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(b) for b in body])


def table_row(item_id: str, size: Tuple[int, int], grid: List[int], processor: Any,
              budget: Dict[str, int]) -> Dict[str, Any]:
    patch = processor.patch_size
    count = processor.get_num_tokens(size[1], size[0], **budget)
    return dict(file=item_id, orig=tuple(size), resized=(grid[2] * patch, grid[1] * patch), grid=tuple(grid),
                patches=grid[0] * grid[1] * grid[2], tokens=int(count.num_tokens))


@dataclasses.dataclass
class Stats:
    images: int = 0
    patches: int = 0
    tokens: int = 0
    errors: int = 0
    nonfinite: int = 0  # images whose features hold NaN/Inf (also counted in errors)
    seconds: float = 0.0
    failed: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # the first (id, error) of this run


def print_summary(args: argparse.Namespace, stats: List[Stats], rows: List[Dict[str, Any]], header: str,
                  skipped: int, total_errors: int, shards: int) -> None:
    wall = max(s.seconds for s in stats)
    images, patches, tokens = (sum(getattr(s, k) for s in stats) for k in ("images", "patches", "tokens"))
    errors = sum(s.errors for s in stats)
    print(header)
    if rows:
        print(format_table(sorted(rows, key=lambda r: r["file"])))
    print(f"images: {images}  total patches: {patches}  total merged tokens: {tokens}")
    print(f"wall time: {wall:.3f} s  throughput: {patches / max(wall, 1e-9):.1f} patches/s "
          f"({tokens / max(wall, 1e-9):.1f} merged tokens/s, {images / max(wall, 1e-9):.2f} images/s)")
    failed = [pair for s in stats for pair in s.failed]
    for item_id, message in failed[:SHOWN_ERRORS]:
        print(f"error: {item_id}: {message}", file=sys.stderr)
    if errors > len(failed[:SHOWN_ERRORS]):
        print(f"... and {errors - len(failed[:SHOWN_ERRORS])} more errors", file=sys.stderr)
    where = f"; output: {args.out} ({shards} shards)" if args.out else ""
    error_note = f" (see {os.path.join(args.out, ERRORS)})" if args.out and total_errors else ""
    print(f"encoded {images} images, skipped {skipped} already done, {errors} errors in this run, "
          f"{total_errors} inputs with errors in total{error_note}{where}")


# ----------------------------------------------------------------------------------------------------------------------
# the job
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EncodeJob:
    """One process's share of the work: decode (in workers), batch by token budget, run the model, hand the
    features to the sink shard by shard, keep the counts (and the table rows when asked)."""

    args: argparse.Namespace
    dataset: Any
    processor: Any
    model: Any
    device: str
    pool: Optional[str]
    sink: ShardSink
    keep_rows: bool
    stats: Stats = dataclasses.field(default_factory=Stats)
    rows: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

    def loader(self, pending: List[Item]):
        from torch.utils.data import DataLoader

        budget = budget_of(self.args)
        return DataLoader(
            EncodeInputs(pending, self.dataset, self.processor, budget),
            batch_sampler=TokenBudgetBatches(pending, self.dataset, self.processor, budget, self.args.max_tokens,
                                             self.args.shard_size),
            num_workers=self.args.workers, collate_fn=collate, pin_memory=self.device.startswith("cuda"),
            prefetch_factor=4 if self.args.workers else None, worker_init_fn=quiet_worker_threads,
        )

    def run(self, pending: List[Item], show_progress: bool) -> None:
        import torch
        from tqdm.auto import tqdm

        progress = tqdm(total=len(pending), unit="img", file=sys.stderr, disable=not show_progress,
                        mininterval=1.0, desc="encoding")
        start = time.perf_counter()
        try:
            self.encode_all(pending, progress, start)
        except (RuntimeError, ConnectionError) as error:  # a worker process died: the DataLoader says so, or the
            # connection that hands a batch over from that worker is reset first
            if isinstance(error, RuntimeError) and not str(error).startswith("DataLoader worker"):
                raise
            raise JobError(f"a DataLoader worker process died ({str(error).strip()}; e.g. out of memory: fewer "
                           "--workers may help); complete shards are kept: rerun the same command to resume") from None
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        progress.close()
        self.stats.seconds = time.perf_counter() - start

    def encode_all(self, pending: List[Item], progress: Any, start: float) -> None:
        import torch

        chunk = 0
        with torch.inference_mode():
            for step, batch in enumerate(self.loader(pending), 1):
                first = (batch["indices"] or [i for i, _ in batch["errors"]])[0]
                if first // self.args.shard_size != chunk:  # batches come chunk by chunk: the last one is complete
                    self.sink.flush()
                    chunk = first // self.args.shard_size
                self.record_errors(batch, pending)
                if batch["indices"]:
                    self.encode_batch(batch, pending)
                maybe_kill("after_batch", step)
                progress.update(len(batch["indices"]) + len(batch["errors"]))
                elapsed = max(time.perf_counter() - start, 1e-9)
                progress.set_postfix_str(f"{self.stats.images / elapsed:.1f} img/s, "
                                         f"{self.stats.patches / elapsed:.0f} tok/s, errors {self.stats.errors}",
                                         refresh=False)
            self.sink.flush()

    def record_errors(self, batch: Dict[str, Any], pending: List[Item]) -> None:
        for index, message in batch["errors"]:
            self.record_error(pending[index], message)

    def record_error(self, item: Item, message: str) -> None:
        self.stats.errors += 1
        self.sink.error({"id": item.id, "error": message, "source": item.source})
        if len(self.stats.failed) < SHOWN_ERRORS:
            self.stats.failed.append((item.id, message))

    def encode_batch(self, batch: Dict[str, Any], pending: List[Item]) -> None:
        feats, finite = forward_features(self.model, batch, self.device, self.args, self.pool)
        check_first_batch(finite, self.stats)
        for index, feature, grid, size, ok in zip(batch["indices"], feats, batch["grid_thws"].tolist(), batch["sizes"],
                                                  finite):
            if not ok:
                self.stats.nonfinite += 1
                self.record_error(pending[index], NONFINITE)
                continue
            self.store(pending[index], feature, grid, size)

    def store(self, item: Item, feature: Any, grid: List[int], size: Tuple[int, int]) -> None:
        """One image's features to the sink, counted (and its table row kept when asked)."""
        record = {"id": item.id, "feature": feature, "grid": grid, "size": list(size)}
        if self.args.meta:
            from .webdataset_source import read_meta

            record["meta"] = read_meta(item)
        self.sink.add(record)
        row = table_row(item.id, size, grid, self.processor, budget_of(self.args))
        self.stats.images += 1
        self.stats.patches += row["patches"]
        self.stats.tokens += row["tokens"]
        if self.keep_rows:
            self.rows.append(row)


NONFINITE = "non-finite features (NaN/Inf) from the model: not stored"


def forward_features(model: Any, batch: Dict[str, Any], device: str, args: argparse.Namespace,
                     pool: Optional[str]) -> Tuple[List[Any], List[bool]]:
    """One packed forward of a collated batch: each image's features on the CPU (own storage: shards never hold views
    of the batch) and whether they are finite."""
    import torch

    grids = batch["grid_thws"]  # [images, 3]
    pixels = batch["pixel_values"].to(device, model.dtype, non_blocking=True)  # [total_patches, C*p*p]
    output = model(pixels, grids)
    feats = [f.to("cpu", copy=True) for f in per_image_features(output, grids, args.features, pool, args.normalize)]
    return feats, [bool(torch.isfinite(f).all()) for f in feats]


def check_first_batch(finite: List[bool], stats: Stats) -> None:
    """A model whose features are NaN/Inf for every image of its first batch is broken: stop before storing."""
    if finite and not any(finite) and stats.images == stats.nonfinite == 0:
        raise JobError(f"the model gives NaN/Inf features for all {len(finite)} images of its first batch: its "
                       "config or weights are broken (e.g. rope_theta, layer_norm_eps); nothing was stored")


def run(args: argparse.Namespace, dist: Dist) -> int:
    import torch

    # the ray engine's driver only probes the model (pooling, refusals) on its CPU: the actors choose their devices
    device = "cpu" if args.engine == "ray" else choose_device(args.device, dist)
    # concrete before the manifest records it; ray actors with GPUs run the dtype a CUDA device prefers
    gpu_actors = args.engine == "ray" and (args.ray_gpus_per_actor or 0) > 0
    args.dtype, dtype_line = resolve_dtype(args.dtype, "cuda" if gpu_actors else device)
    items, dataset = collect_inputs(args)
    config = load_config(args)
    # before the first oneDNN matmul (the model's load runs none); the ray engine's actors set their own
    allocator_line = (
        apply_cpu_job_memory_settings(args.cpu_allocator, device, args.max_tokens, config.cpu_block_tokens)
        if args.engine == "local" else None
    )
    processor = load_processor(args.model)
    check_budget(args, processor)
    # Everything that can still refuse the command (model, attention backend, pooling) comes before DIR is touched.
    if dist.world_size > 1 and device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
    try:
        model, source = load_model(args, config, device, announce=dist.rank == 0)
    except (ImportError, ValueError) as error:  # --attn flash_attention_2 without flash-attn; a refused config value
        raise UsageError(str(error).strip().splitlines()[0]) from None
    pool = resolve_pool(args, model, processor, device)
    if args.out is not None:
        # rank 0 alone hashes the weights and prepares the folder; the other ranks wait for its verdict
        on_rank0(dist, lambda: prepare_output(args.out, make_fingerprint(args, config, processor, pool),
                                              args.overwrite, args.retry_errors))
        done, errored, _ = done_ids(args.out)
    else:
        done, errored = set(), set()
    mine = [item for item in items if owner_rank(item.id, dist.world_size) == dist.rank]
    pending = [item for item in mine if item.id not in done and item.id not in errored]
    skipped = sum(dist.gather(len(mine) - len(pending)))
    meta = {"features": args.features, "pool": str(pool), "normalize": str(args.normalize),
            "model": os.path.abspath(args.model), "weights": source, "dtype": args.dtype}
    keep_rows = args.table if args.table is not None else args.out is None
    job = EncodeJob(args, dataset, processor, model, device, pool, ShardSink(args.out, args.format, dist.rank, meta),
                    keep_rows)
    if args.engine == "ray":
        from .encode_ray import run_on_ray

        job.model = model = None  # the actors load their own
        run_on_ray(job, pending)
    else:
        job.run(pending, show_progress=dist.rank == 0)

    all_stats = dist.gather(job.stats)  # also waits until every rank has written its last shard
    all_rows = [row for part in dist.gather(job.rows) for row in part]
    if dist.rank != 0:
        return 0  # rank 0 reports, and its exit status carries --strict
    total_errors, shards = sum(s.errors for s in all_stats), 0
    if args.out is not None:
        _, errored_now, shards = done_ids(args.out)
        total_errors = len(errored_now & {item.id for item in items})
    where = f"device={device}, processes={dist.world_size}" if args.engine == "local" else "engine=ray"
    header = (f"model: {args.model} ({source}), attn={args.attn}, dtype={args.dtype}, {where}, "
              f"features={args.features}" + (f", pool={pool}" if pool else ""))
    lines = [header, dtype_line, *([allocator_line] if allocator_line else [])]
    print_summary(args, all_stats, all_rows, "\n".join(lines), skipped, total_errors, shards)
    return 1 if args.strict and total_errors else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_args(args)
        if args.shard_size is None:
            args.shard_size = DEFAULT_SHARD_SIZE[args.features]
        dist = Dist.from_env()
        try:
            return run(args, dist)
        finally:
            release_locks()
            dist.close()
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except JobError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. the disk is full: nothing half-written stays (temporary names), shards are kept
        print(f"{parser.prog}: error: {error}; complete shards are kept: rerun the same command to resume",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
