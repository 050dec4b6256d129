"""Helpers for the scripts/encode.py tests: generated images, a tiny saved checkpoint, an independent reference
(the model run image by image through the Auto API, eager attention) and the README's documented loader."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "encode.py"  # the documented shim: runs siglip2_navit.tools.encode
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
# small pixel budgets keep every image at 16-64 patches (factor 32: 1-4 blocks of 2x2 patches per side)
BUDGET = {"min_pixels": 32 * 32, "max_pixels": 128 * 128}
# ... and fp32 pinned: the features are compared with an fp32 reference, and `--dtype auto` (the default) picks bf16
# on a CPU with native bf16 matmuls (tests that want another dtype pass `--dtype` after these: the last one counts)
BUDGET_ARGS = ["--min-pixels", str(BUDGET["min_pixels"]), "--max-pixels", str(BUDGET["max_pixels"]), "--dtype", "fp32"]
PROCESSOR_FILES = (
    "image_processing_siglip2_navit.py", "navit_image_utils.py", "navit_batching.py", "preprocessor_config.json",
    "processor_config.json",
)


def load_encode_module():
    from siglip2_navit.tools import encode

    return encode


def env(**extra: str) -> Dict[str, str]:
    values = dict(os.environ)
    values.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        values.pop(key, None)
    values.update(extra)
    return values


def run_script(args: List[str], timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env(**extra_env), cwd=str(ROOT), timeout=timeout)


def make_images(folder: Path, count: int, seed: int = 0, prefix: str = "img") -> List[str]:
    """`count` smooth random images of 40-160 px per side, PNG and JPEG alternately; returns their file names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        height, width = (int(v) for v in rng.integers(40, 161, size=2))
        base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
        image = PIL.Image.fromarray(base).resize((width, height), PIL.Image.BILINEAR)
        name = f"{prefix}{i:03d}.{'png' if i % 2 else 'jpg'}"
        image.save(folder / name)
        names.append(name)
    return names


def make_bad_files(folder: Path, good_jpeg: Path) -> List[str]:
    """An empty file, a truncated JPEG and text with an image extension."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zz_empty.png").write_bytes(b"")
    data = good_jpeg.read_bytes()
    (folder / "zz_truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zz_text.png").write_text("not an image")
    return ["zz_empty.png", "zz_text.png", "zz_truncated.jpg"]


def save_checkpoint(folder: Path, use_head: bool = False, seed: int = 1) -> Path:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(ROOT), trust_remote_code=True)
    for key, value in TINY.items():
        setattr(config, key, value)
    config.vision_use_head = use_head
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, trust_remote_code=True).eval()
    model.save_pretrained(str(folder))
    for name in PROCESSOR_FILES:
        shutil.copy(ROOT / name, folder / name)
    return folder


class Reference:
    """Features of each image computed on its own: processor + model through the Auto API, eager attention."""

    def __init__(self, model_dir: Path, budget: Optional[Dict[str, int]] = None) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.budget = BUDGET if budget is None else budget
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir), trust_remote_code=True)
        self.model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, attn_implementation="eager")
        self.model.eval()
        self.cache: Dict[str, tuple] = {}

    def __call__(self, path) -> tuple:
        """(tokens [patches, D], pooler_output [D] or None, grid [t, h, w])"""
        key = str(path)
        if key not in self.cache:
            with PIL.Image.open(path) as image:
                image = PIL.ImageOps.exif_transpose(image)
                inputs = self.processor(images=[image], return_tensors="pt", **self.budget)
            with torch.no_grad():
                out = self.model(inputs["pixel_values"], inputs["grid_thws"])
            pooled = None if out.pooler_output is None else out.pooler_output[0]
            self.cache[key] = (out.last_hidden_state, pooled, inputs["grid_thws"][0].tolist())
        return self.cache[key]


def readme_loader():
    """The `load_encoded` function exactly as the README documents it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "def load_encoded" in b)
    namespace: Dict[str, object] = {}
    exec(compile(code, "README.md:load_encoded", "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["load_encoded"]


def assert_matches_reference(features: Dict[str, torch.Tensor], paths: Dict[str, Path], reference: Reference,
                             pooled: bool = False) -> None:
    assert sorted(features) == sorted(paths)
    for item_id, path in paths.items():
        tokens, head, _ = reference(path)
        expected = head if pooled else tokens
        torch.testing.assert_close(features[item_id].float(), expected, atol=1e-4, rtol=1e-4, msg=item_id)


def make_shard(path: Path, members: List[tuple]) -> Path:
    """A WebDataset .tar shard holding `members`: (name inside the tar, bytes), in that order."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
