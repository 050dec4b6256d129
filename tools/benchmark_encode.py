# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""End-to-end throughput and memory of the encode job (navit-encode) against the model alone.

On the same generated JPEG photos-like images and the same (randomly initialised) weights:

    model alone     the images decoded and preprocessed beforehand (untimed), then only the forward passes, in the
                    same token-budget batches the job uses
    job, workers W  `navit-encode FOLDER --out DIR --workers W` as a subprocess: decoding, preprocessing, batching,
                    the forward passes and writing durable shards; its own timed loop ("wall time" it prints) and
                    the whole process (imports and model loading included)
    job, ray        `navit-encode FOLDER --out DIR --engine ray` (a local Ray cluster it starts: decode tasks, one
                    encoder actor with `--ray-cpus-per-actor` CPUs); its timed loop includes starting the actor and
                    loading the model there, the whole process also starting the cluster
    peak RSS        the job's own process (the driver; workers 0) on 1x and on `--scale`x the images with the same
                    --shard-size: flat when features stream to disk shard by shard

    python -m siglip2_navit.tools.benchmark_encode                     # ~10 min on 2 CPU cores
    python -m siglip2_navit.tools.benchmark_encode --engines local     # ~2 min: without the ray engine
    python -m siglip2_navit.tools.benchmark_encode --images 200 --layers 27 --hidden 1152 --device cuda
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import PIL.Image
import torch

from .dtypes import DTYPES, resolve_dtype


ROOT = Path(__file__).resolve().parents[1]  # the package: a model folder with the SigLIP2 config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="images at 1x (default 48)")
    parser.add_argument("--scale", type=int, default=5, help="the larger run for peak RSS: this many times the images")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to time (default 0 2)")
    parser.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"],
                        help="engines to time (default local ray; ray needs the [ray] extra)")
    parser.add_argument("--ray-cpus-per-actor", type=float, default=1.0,
                        help="CPUs of the ray engine's encoder actor (default 1: the other CPUs decode)")
    parser.add_argument("--hidden", type=int, default=384, help="hidden size (default 384; so400m: 1152)")
    parser.add_argument("--layers", type=int, default=4, help="encoder layers (default 4; so400m: 27)")
    parser.add_argument("--min-pixels", type=int, default=128 * 128)
    parser.add_argument("--max-pixels", type=int, default=384 * 384)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=16, help="images per shard in every job run (default 16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="of every run (default auto: what navit-encode picks on --device)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each timing; the fastest is reported (robust to a loaded machine; default 2)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args()


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Photo-sized JPEGs (256-1024 px per side): smooth colour fields plus noise, so decoding costs what it does."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        height, width = (int(v) for v in rng.integers(256, 1025, size=2))
        base = PIL.Image.fromarray(rng.integers(0, 256, size=(6, 6, 3)).astype(np.uint8)).resize((width, height))
        noise = rng.normal(0, 12, size=(height, width, 3))
        pixels = np.clip(np.asarray(base, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"img{i:05d}.jpg", quality=90)


def replicate(source: Path, target: Path, times: int) -> None:
    """`times` hard links of every file of `source` under new names (distinct ids, no extra disk)."""
    target.mkdir(parents=True)
    for k in range(times):
        for path in sorted(source.iterdir()):
            os.link(path, target / f"c{k}_{path.name}")


def save_checkpoint(folder: Path, args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(ROOT), trust_remote_code=True)
    heads = max(1, args.hidden // 64)
    for key, value in dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                           intermediate_size=4 * args.hidden).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(str(folder))
    for name in ("image_processing_siglip2_navit.py", "navit_image_utils.py", "navit_batching.py",
                 "preprocessor_config.json", "processor_config.json"):
        (folder / name).write_bytes((ROOT / name).read_bytes())


def model_alone(model_dir: Path, images: Path, args: argparse.Namespace) -> Tuple[float, int]:
    """Seconds for the forward passes only (inputs prepared beforehand) and the number of patches."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(str(model_dir), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True)
    model = model.to(args.device, DTYPES[args.dtype]).eval()  # the model casts its inputs
    budget = dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    samples = [processor(images=str(p), return_tensors="pt", **budget) for p in sorted(images.iterdir())]
    counts = [int(s["grid_thws"].prod(-1).sum()) for s in samples]
    batches = [processor.collate_packed([samples[i] for i in group])
               for group in processor.pack_by_token_budget(counts, args.max_tokens)]
    times = []
    with torch.inference_mode():
        model(batches[0]["pixel_values"].to(args.device), batches[0]["grid_thws"])  # warm-up
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in batches:
                model(batch["pixel_values"].to(args.device), batch["grid_thws"])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return min(times), sum(counts)


# navit-encode's main in this process, then this process's own peak RSS: the driver alone (wait4 would also count
# the processes a job waits for, such as the local Ray cluster the ray engine starts and stops)
JOB = ("import resource, sys\nfrom siglip2_navit.tools.encode import main\ncode = main(sys.argv[1:])\n"
       "print(f'peak RSS KiB: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}')\nsys.exit(code)")


def run_job(model_dir: Path, images: Path, out: Path, engine: Tuple[str, int], args: argparse.Namespace,
            repeats: int) -> Dict[str, float]:
    """The fastest of `repeats` fresh runs (`--overwrite`), as measured by `job_once`."""
    runs = [job_once(model_dir, images, out, engine, args) for _ in range(repeats)]
    return min(runs, key=lambda r: r["loop_s"])


def job_once(model_dir: Path, images: Path, out: Path, engine: Tuple[str, int], args: argparse.Namespace
             ) -> Dict[str, float]:
    """Run navit-encode (engine: ("local", workers) or ("ray", 0)); its timed loop, the whole process's wall time
    and its own peak RSS (MiB)."""
    name, workers = engine
    cmd = [sys.executable, "-c", JOB, str(images), "--out", str(out), "--model", str(model_dir),
           "--min-pixels", str(args.min_pixels), "--max-pixels", str(args.max_pixels), "--max-tokens",
           str(args.max_tokens), "--shard-size", str(args.shard_size), "--device", args.device, "--dtype", args.dtype, "--overwrite"]
    cmd += (["--workers", str(workers)] if name == "local" else
            ["--engine", "ray", "--ray-actors", "1", "--ray-cpus-per-actor", str(args.ray_cpus_per_actor)])
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    total = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"navit-encode failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}")
    loop = float(re.search(r"wall time: ([\d.]+) s", result.stdout).group(1))
    rss = int(re.search(r"peak RSS KiB: (\d+)", result.stdout).group(1))
    return {"loop_s": loop, "process_s": total, "peak_rss_mib": rss / 1024}


def main() -> None:
    args = parse_args()
    args.dtype, dtype_line = resolve_dtype(args.dtype, args.device)  # one dtype for the model alone and every job
    results: Dict[str, object] = {"settings": vars(args), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_images(base / "images", args.images)
        replicate(base / "images", base / "images_x", args.scale)
        save_checkpoint(base / "model", args)
        seconds, patches = model_alone(base / "model", base / "images", args)
        rows: List[Tuple[str, float, str]] = [("model alone (inputs prepared beforehand)", args.images / seconds, "")]
        results["model_alone"] = {"seconds": seconds, "images_per_s": args.images / seconds, "patches": patches}
        engines = [(e, w) for e in args.engines for w in (args.workers if e == "local" else [0])]
        for engine in engines:
            label = f"--engine ray (1 actor, {args.ray_cpus_per_actor:g} CPU)" if engine[0] == "ray" else \
                f"--workers {engine[1]}"
            job = run_job(base / "model", base / "images", base / "out", engine, args, args.repeats)
            results[f"{engine[0]}_workers_{engine[1]}"] = job
            rows.append((f"navit-encode {label}", args.images / job["loop_s"],
                         f"{args.images / job['process_s']:.2f} img/s with start-up; peak RSS "
                         f"{job['peak_rss_mib']:.0f} MiB"))
            if engine[1] == 0:  # the same job on `--scale`x the images: its rate, and whether the memory stays flat
                big = run_job(base / "model", base / "images_x", base / "out", engine, args, 1)
                results[f"{engine[0]}_workers_0_x{args.scale}"] = big
                rows.append((f"navit-encode {label}, {args.scale}x the images",
                             args.images * args.scale / big["loop_s"],
                             f"{args.images * args.scale / big['process_s']:.2f} img/s with start-up; peak RSS "
                             f"{big['peak_rss_mib']:.0f} MiB"))
    print(f"{args.images} images ({patches} patches), hidden {args.hidden}, {args.layers} layers, "
          f"device {args.device}, {os.cpu_count()} CPUs\n{dtype_line}\n")
    print("| run | images/s | notes |\n|---|---|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate:.2f} | {note} |")
    for line in engine_ratios(results, args):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def engine_ratios(results: Dict[str, object], args: argparse.Namespace) -> List[str]:
    """The ray engine's rate over the local engine's (both without workers) at 1x and `--scale`x the images, and the
    marginal ratio from the two runs' difference (the engines' fixed start-up costs cancel out)."""
    keys = ("local_workers_0", f"local_workers_0_x{args.scale}", "ray_workers_0", f"ray_workers_0_x{args.scale}")
    if not all(key in results for key in keys):
        return []
    local, local_x, ray, ray_x = (results[key]["loop_s"] for key in keys)  # type: ignore[index]
    extra = args.images * (args.scale - 1)
    if ray_x > ray and local_x > local:
        marginal = f"{(local_x - local) / (ray_x - ray):.2f}×"  # (extra / ray's extra time) / (extra / local's)
    else:
        marginal = "undefined (a larger run was not slower: noise, use more images)"
    return ["", f"ray ÷ local (target ≥ 0.8× on one node): {local / ray:.2f}× at {args.images} images, "
                f"{local_x / ray_x:.2f}× at {args.images * args.scale}; marginal (the {extra} more images): "
                f"{marginal}"]


if __name__ == "__main__":
    main()
