# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The README's claims about this source repository hold: its folder has no weights (`from_pretrained` raises
`OSError`), and the one-line recipe after `<!-- recipe:random-model -->`, run as written in a copy of the repository
(with a tiny `config.json`), writes a random-weight model folder that loads with the Auto API and the pipeline.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT



from siglip2_navit.tools import checkpoint_utils as utils  # noqa: E402


MARKER = "<!-- recipe:random-model -->"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def recipe_command() -> list:
    """The recipe's command line, split as the shell would split it."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(re.escape(MARKER) + r"\n```bash\n(.*?)\n```\n", text, re.S)
    assert match, f"README.md has no bash block right after {MARKER}"
    assert "\n" not in match.group(1), "the recipe must stay one line"
    return shlex.split(match.group(1))


def repo_copy(dst: Path) -> Path:
    """What the recipe reads in a clone (code, configs, card and its assets), config made tiny."""
    dst.mkdir()
    for name in (*utils.SIGLIP2.code_files, utils.MODEL_CARD, "__init__.py", "config.json"):
        shutil.copy(REPO_ROOT / name, dst / name)
    for name in utils.CARD_ASSETS:
        shutil.copytree(REPO_ROOT / name, dst / name)
    config = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    (dst / "config.json").write_text(json.dumps({**config, **TINY}, indent=2), encoding="utf-8")
    return dst


def test_repo_folder_has_no_weights():
    from transformers import AutoModel

    with pytest.raises(OSError, match="model.safetensors"):
        AutoModel.from_pretrained(REPO_ROOT, trust_remote_code=True)


def test_random_model_recipe(tmp_path):
    from transformers import AutoImageProcessor, AutoModel, pipeline

    program, flag, code = recipe_command()
    assert (program, flag) == ("python", "-c")
    repo = repo_copy(tmp_path / "clone")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    folder = repo / "random-siglip2-navit"
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not any(info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.hidden_size == TINY["hidden_size"]
    weight = model.vision_model.embeddings.patch_embedding.weight
    assert weight.std() > 0, "the weights must be random, not constant"

    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    extractor = pipeline("image-feature-extraction", model=str(folder), trust_remote_code=True)
    image = str(folder / "examples" / "chelsea.png")  # the folder ships the card's sample images
    with torch.no_grad():
        expected = model.eval()(**processor(images=image, return_tensors="pt")).last_hidden_state[None]
    torch.testing.assert_close(extractor(image, return_tensors=True), expected, rtol=1e-5, atol=1e-5)
