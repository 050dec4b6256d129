# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""navit-encode on Ray Data (`--engine ray`), and `NavitBatchEncoder`, the encoder for a Ray Data pipeline of your own.

    ds.map_batches(NavitBatchEncoder, fn_constructor_kwargs={"model": "./siglip2-navit-ovis2.5-9b",
                   "features": "pooled"}, batch_size=32, concurrency=4, num_gpus=1)

The engine: the driver lists the inputs (as the local engine does: the same ids, the same done set), Ray tasks
decode and preprocess them, a pool of actors (each loading the model once; restarted and its batch retried when it
dies) packs each batch to the token budget and encodes it, and the driver writes the shards, errors.jsonl and the
manifest through the local engine's own sink: the output folder is the same whichever engine wrote it. Features
travel to the driver through Ray's object store.
"""

import argparse
import functools
import io
import json
import logging
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

from .encode import (
    NONFINITE,
    Dist,
    EncodeJob,
    budget_of,
    build_parser,
    check_budget,
    check_first_batch,
    choose_device,
    forward_features,
    load_config,
    load_model,
    load_processor,
    resolve_pool,
)
from .encode_inputs import Item, JobError, UsageError, collate, decode_image, open_dataset, open_image, preprocess
from .encode_output import KILL_ENV, maybe_kill
from .cpu_allocator import apply_cpu_job_memory_settings
from .dtypes import DTYPES, resolve_dtype
from .webdataset_source import item_as_dict, item_from_dict


DECODE_BATCH_ROWS = 8  # images per decode task call
ACTOR_BATCH_ROWS = 32  # images per encoder actor call, packed into --max-tokens forwards there
# Ray Data's own defaults restart a dead encoder actor and retry its batch forever; bounded here, so that a batch
# that kills its actor every time (e.g. out of memory) ends the job instead of looping. (Decode tasks keep Ray's
# default: a task lost with its worker or node is retried.)
MAX_RESTARTS = 8  # times Ray restarts a dead encoder actor
MAX_RETRIES = 8  # times Ray retries a batch whose actor died
# Test hook, with KILL_ENV="actor_batch:<n>": the encoder actor SIGKILLs itself at its n-th batch, once per job (the
# file named here is created when it does; a restarted actor finds it and goes on).
KILL_ONCE_ENV = "SIGLIP2_NAVIT_ENCODE_KILL_ONCE"
RAY_HINT = 'pip install "siglip2-navit[ray]"'


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine ray needs Ray Data: {RAY_HINT}") from None
    return ray


def check_ray_args(args: argparse.Namespace) -> None:
    import_ray()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--engine ray runs as one driver process: start it without torchrun / accelerate launch")
    if args.ray_actors is not None and args.ray_actors < 1:
        raise UsageError(f"--ray-actors must be >= 1, got {args.ray_actors}")
    if args.ray_gpus_per_actor is not None and args.ray_gpus_per_actor < 0:
        raise UsageError(f"--ray-gpus-per-actor must be >= 0, got {args.ray_gpus_per_actor}")
    if args.ray_cpus_per_actor <= 0:
        raise UsageError(f"--ray-cpus-per-actor must be positive, got {args.ray_cpus_per_actor}")


def connect(ray: Any) -> bool:
    """Join the cluster at RAY_ADDRESS, or start a local one (saying which); True when this call connected (the job
    disconnects at its end, which also stops a local cluster it started)."""
    if ray.is_initialized():
        where, started = "the running Ray session", False
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        where, started = f"the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}", True
    else:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)  # never a stale cluster
        where, started = "a local Ray cluster (RAY_ADDRESS is not set)", True
    resources = ray.cluster_resources()
    print(f"ray: on {where}: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs", file=sys.stderr)
    return started


# ----------------------------------------------------------------------------------------------------------------------
# the encoder (an actor in Ray Data), and the decode tasks
# ----------------------------------------------------------------------------------------------------------------------


def encoder_args(settings: Dict[str, Any]) -> argparse.Namespace:
    """navit-encode's settings with these changed (the command's names, `-` as `_`): checked like the command line."""
    parser = build_parser()
    args = parser.parse_args([])
    actions = {action.dest: action for action in parser._actions}
    for key, value in settings.items():
        if key not in actions or key in ("inputs", "help"):
            raise ValueError(f"NavitBatchEncoder: unknown setting {key!r} (expected navit-encode's option names, "
                             "e.g. model, features, pool, normalize, dtype, attn, device, max_tokens, max_pixels)")
        if actions[key].choices is not None and value not in actions[key].choices:
            raise ValueError(f"NavitBatchEncoder: {key}={value!r}, expected one of {sorted(actions[key].choices)}")
        setattr(args, key, value)
    if args.max_tokens <= 0:
        raise ValueError(f"NavitBatchEncoder: max_tokens must be positive, got {args.max_tokens}")
    return args


class NavitBatchEncoder:
    """A Ray Data callable class: a batch of images (and ids) in, their features out.

    In: the column `image_column` (default "image") holding encoded image bytes (JPEG, PNG, ...) or HxWxC uint8
    arrays, and the column `id_column` (default "id"). Out: every input column except the image, plus
    `embedding` (pooled: float32 [rows, D]; tokens: one float32 [patches, D] array per row), `grid_thws` int32
    [rows, 3], `size` int32 [rows, 2] (width, height after EXIF orientation) and `error` (text, "" when the row was
    encoded; an undecodable image or NaN/Inf features: its embedding is zeros). Each call packs its rows into
    forwards of at most `max_tokens` patches. Settings are navit-encode's options (model, features="pooled", pool,
    normalize, dtype, attn, device, min_pixels, max_pixels, max_tokens, ...); the model loads once per actor. On a
    CPU, the actor's process keeps freed memory for reuse (`cpu_allocator="retain"`, the default, as navit-encode;
    `"default"` leaves glibc's malloc settings alone).
    """

    def __init__(self, model: str, features: str = "pooled", image_column: str = "image", id_column: str = "id",
                 num_threads: Optional[int] = None, **settings: Any) -> None:
        import torch

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.args = encoder_args(dict(settings, model=model, features=features))
        self.image_column, self.id_column = image_column, id_column
        self.processor = load_processor(self.args.model)
        check_budget(self.args, self.processor)
        self.device = choose_device(self.args.device, Dist())
        self.args.dtype, _ = resolve_dtype(self.args.dtype, self.device)  # `auto`: what this actor's device prefers
        config = load_config(self.args)
        apply_cpu_job_memory_settings(  # an actor is its own process
            self.args.cpu_allocator, self.device, self.args.max_tokens, config.cpu_block_tokens
        )
        self.model, _ = load_model(self.args, config, self.device, announce=True)
        self.pool = resolve_pool(self.args, self.model, self.processor, self.device)
        self.calls = 0

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        import numpy as np

        self.calls += 1
        kill_once("actor_batch", self.calls)
        if self.id_column not in batch:
            raise ValueError(f"NavitBatchEncoder: the batch has no id column {self.id_column!r} "
                             f"(columns: {sorted(batch)}); name it with id_column=")
        samples = prepared_samples(batch) if "pixel_values" in batch else self.decode(batch)
        features, errors = self.encode(samples)
        out = {k: v for k, v in batch.items() if k not in (self.image_column, "pixel_values")}
        out["embedding"] = feature_column(features, self.args.features, int(self.model.config.hidden_size))
        out["grid_thws"] = np.array([s["grid"].reshape(3).tolist() if "grid" in s else [0, 0, 0] for s in samples],
                                    dtype=np.int32).reshape(-1, 3)
        out["size"] = np.array([list(s.get("size", (0, 0))) for s in samples], dtype=np.int32).reshape(-1, 2)
        out["error"] = np.array(errors, dtype=object)
        return out

    def decode(self, batch: Dict[str, Any]) -> List[Dict[str, Any]]:
        if self.image_column not in batch:
            raise ValueError(f"NavitBatchEncoder: the batch has no image column {self.image_column!r} "
                             f"(columns: {sorted(batch)}); name it with image_column=")
        budget = budget_of(self.args)
        return [preprocess(i, functools.partial(image_from_value, value), self.processor, budget)
                for i, value in enumerate(batch[self.image_column])]

    def encode(self, samples: List[Dict[str, Any]]) -> tuple:
        """Features per row (None where it failed) and error texts per row ("" where it was encoded)."""
        import torch

        features: List[Any] = [None] * len(samples)
        errors = [s.get("error", "") for s in samples]
        good = [s for s in samples if "error" not in s]
        counts = [int(s["grid"].prod()) for s in good]
        with torch.inference_mode():
            for group in self.processor.pack_by_token_budget(counts, self.args.max_tokens):
                batch = collate([good[j] for j in group])
                feats, finite = forward_features(self.model, batch, self.device, self.args, self.pool)
                for index, feature, ok in zip(batch["indices"], feats, finite):
                    if ok:
                        features[index] = feature.float().numpy()
                    else:
                        errors[index] = NONFINITE
        return features, errors


def image_from_value(value: Any) -> Any:
    """A PIL image from encoded bytes or an HxWxC / HxW uint8 array."""
    import numpy as np
    import PIL.Image

    if isinstance(value, (bytes, bytearray, memoryview)):
        return open_image(io.BytesIO(bytes(value)))
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected encoded image bytes or an HxWxC uint8 array, got {array.dtype} {array.shape}")
    return PIL.Image.fromarray(array)


def feature_column(features: List[Any], kind: str, width: int) -> Any:
    """pooled: [rows, D] float32 (zeros where a row failed); tokens: an object array of [patches, D] float32 arrays."""
    import numpy as np

    if kind == "pooled" and all(f is None or f.shape == (width,) for f in features):
        return np.stack([np.zeros(width, np.float32) if f is None else f for f in features]) if features else \
            np.zeros((0, width), np.float32)
    column = np.empty(len(features), dtype=object)
    for i, f in enumerate(features):
        column[i] = np.zeros((0, width), np.float32) if f is None else f
    return column


def prepared_samples(batch: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The rows `decode_batch` made, back as `preprocess` samples."""
    import numpy as np
    import torch

    samples = []
    for i, (pixels, grid, size, error) in enumerate(zip(batch["pixel_values"], batch["grid_thws"], batch["size"],
                                                        batch["error"])):
        if error:
            samples.append({"index": i, "error": str(error)})
            continue
        grid = torch.as_tensor(np.asarray(grid, dtype=np.int64)).reshape(1, 3)
        values = torch.from_numpy(np.frombuffer(pixels, dtype=np.float32).copy())
        samples.append({"index": i, "pixel_values": values.reshape(int(grid.prod()), -1), "grid": grid,
                        "size": tuple(int(v) for v in size)})
    return samples


@functools.lru_cache(maxsize=4)
def cached_processor(model: str) -> Any:
    return load_processor(model)


@functools.lru_cache(maxsize=4)
def cached_dataset(path: str, split: Optional[str], column: str) -> Any:
    return open_dataset(path, split, column)


def decode_batch(batch: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
    """A Ray task: the engine's items decoded and preprocessed, as the columns NavitBatchEncoder takes instead of
    images (pixel values as float32 bytes, grid_thws, size, error)."""
    import numpy as np

    processor = cached_processor(settings["model"])
    dataset = cached_dataset(*settings["dataset"]) if settings["dataset"] else None
    items = [item_from_dict(json.loads(text)) for text in batch["item"]]
    samples = [preprocess(i, functools.partial(decode_image, item, dataset), processor, settings["budget"])
               for i, item in enumerate(items)]
    pixels = np.empty(len(samples), dtype=object)
    for i, s in enumerate(samples):
        pixels[i] = s["pixel_values"].numpy().astype(np.float32).tobytes() if "error" not in s else b""
    return {
        "id": np.array([item.id for item in items], dtype=object),
        "pixel_values": pixels,
        "grid_thws": np.array([s["grid"].reshape(3).tolist() if "grid" in s else [0, 0, 0] for s in samples],
                              dtype=np.int64).reshape(-1, 3),
        "size": np.array([list(s.get("size", (0, 0))) for s in samples], dtype=np.int64).reshape(-1, 2),
        "error": np.array([s.get("error", "") for s in samples], dtype=object),
    }


def kill_once(point: str, count: int) -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if marker is None or os.environ.get(KILL_ENV) != f"{point}:{count}":
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    maybe_kill(point, count)


# ----------------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------------


def actor_resources(ray: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """The encoder pool: --ray-actors actors (default one per GPU of the cluster, or 1 without GPUs)."""
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    gpus = args.ray_gpus_per_actor if args.ray_gpus_per_actor is not None else (1.0 if cluster_gpus else 0.0)
    actors = args.ray_actors or (max(1, int(cluster_gpus // gpus)) if gpus else 1)
    return dict(compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=args.ray_cpus_per_actor)


def encoder_settings(args: argparse.Namespace, pool: Optional[str]) -> Dict[str, Any]:
    """NavitBatchEncoder's keyword arguments for this command (the pooling the driver resolved)."""
    keys = ("model", "features", "normalize", "dtype", "attn", "device", "min_pixels", "max_pixels", "max_tokens",
            "seed", "config_overrides")
    settings = {key: getattr(args, key) for key in keys}
    if pool is not None:
        settings["pool"] = pool
    return settings


def build_dataset(ray: Any, args: argparse.Namespace, pending: List[Item], pool: Optional[str]) -> Any:
    """items -> decode tasks -> encoder actors (Ray Data streams it; nothing runs before it is iterated)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    resources = actor_resources(ray, args)
    kill_env = {k: os.environ[k] for k in (KILL_ENV, KILL_ONCE_ENV) if k in os.environ}
    decode_settings = {"model": args.model, "budget": budget_of(args),
                       "dataset": None if args.dataset is None else [args.dataset, args.split, args.image_column]}
    ds = ray.data.from_items([{"item": json.dumps(item_as_dict(item))} for item in pending])
    ds = ds.map_batches(decode_batch, fn_kwargs={"settings": decode_settings}, batch_size=DECODE_BATCH_ROWS,
                        batch_format="numpy", num_cpus=1)
    threads = max(1, int(round(resources["num_cpus"]))) if not resources["num_gpus"] else None
    with warnings.catch_warnings():  # Ray 2.60 deprecates passing actor options as keywords, with no replacement yet
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(NavitBatchEncoder, fn_constructor_kwargs=dict(encoder_settings(args, pool),
                                                                           num_threads=threads),
                              batch_size=ACTOR_BATCH_ROWS, batch_format="numpy", max_restarts=MAX_RESTARTS,
                              max_task_retries=MAX_RETRIES, runtime_env={"env_vars": kill_env} if kill_env else None,
                              **resources)


def run_on_ray(job: EncodeJob, pending: List[Item]) -> None:
    """The job's pending items encoded on Ray; features and errors go to the job's sink (the driver writes DIR)."""
    from tqdm.auto import tqdm

    if not pending:
        return
    ray = import_ray()
    started = connect(ray)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    waiting = {item.id: item for item in pending}  # a row Ray delivers twice is stored once
    dtype = DTYPES[job.args.dtype]
    progress = tqdm(total=len(pending), unit="img", file=sys.stderr, mininterval=1.0, desc="encoding (ray)")
    start = time.perf_counter()
    try:
        for batch in build_dataset(ray, job.args, pending, job.pool).iter_batches(batch_size=None,
                                                                                  batch_format="numpy"):
            store_batch(job, batch, waiting, dtype)
            progress.update(len(batch["id"]))
        job.sink.flush()
    except ray.exceptions.RayError as error:
        raise JobError(f"the Ray job failed ({first_line(error)}); complete shards are kept: rerun the same command "
                       "to resume") from None
    finally:
        progress.close()
        job.stats.seconds = time.perf_counter() - start
        if started:
            ray.shutdown()


def store_batch(job: EncodeJob, batch: Dict[str, Any], waiting: Dict[str, Item], dtype: Any) -> None:
    """One result batch into the sink (a shard is written every --shard-size images)."""
    import numpy as np
    import torch

    errors = [str(e) for e in batch["error"]]
    check_first_batch([e != NONFINITE for e in errors if e in ("", NONFINITE)], job.stats)
    for i, item_id in enumerate(batch["id"]):
        item = waiting.pop(str(item_id), None)
        if item is None:
            continue
        if errors[i]:
            job.stats.nonfinite += errors[i] == NONFINITE
            job.record_error(item, errors[i])
            continue
        feature = torch.from_numpy(np.array(batch["embedding"][i], dtype=np.float32)).to(dtype)  # own copy
        job.store(item, feature, [int(v) for v in batch["grid_thws"][i]], tuple(int(v) for v in batch["size"][i]))
        if len(job.sink.records) >= job.args.shard_size:
            job.sink.flush()


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
