# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""`pipeline("image-feature-extraction", model=folder, trust_remote_code=True)` gives every image exactly its own
features, for any `batch_size`.

Reference: the model called on each image alone (`model(**processor(image))`), computed here without the pipeline.
transformers' own pipeline (what a folder without `custom_pipelines` gets) cuts the packed output row by row when
batching, so these tests fail without the remote-code pipeline.
"""

import importlib
import json
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, tiny_model



from siglip2_navit.tools import checkpoint_utils as utils  # noqa: E402


TASK = "image-feature-extraction"
# (height, width) of the test images: with the processor below, 4 images of 4 different token counts
SIZES = ((40, 72), (96, 64), (96, 96), (32, 128))
PROCESSOR_KWARGS = {"min_pixels": 32 * 32, "max_pixels": 160 * 160}


def arrays() -> List[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def images() -> List[Image.Image]:
    """PIL images: what transformers' own pipeline takes too (so that these tests fail on it for the right reason)."""
    return [Image.fromarray(array) for array in arrays()]


def converted_folder(path: Path, **config_overrides) -> Path:
    """A tiny random model folder written the way the converters write theirs."""
    config = utils.config_class()(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **config_overrides
    )
    torch.manual_seed(0)
    model = utils.import_package().Siglip2NavitModel(config)
    with torch.no_grad():  # random (not init-default) biases and norms: every parameter matters
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return utils.atomic_write_folder(path, lambda tmp: utils.save_model_folder(tmp, model.state_dict(), config))


def references(folder: Path) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per image, called alone: `[1, tokens, hidden]` features and the `[1, hidden]` pooled embedding (the head's
    output, or the mean of the image's tokens for a headless model)."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    features, pooled = [], []
    for image in images():
        with torch.no_grad():
            out = model(**processor(images=image, return_tensors="pt", **PROCESSOR_KWARGS))
        features.append(out.last_hidden_state[None])
        head = out.pooler_output
        pooled.append(head if head is not None else out.last_hidden_state.mean(0, keepdim=True))
    return features, pooled


def feature_pipeline(folder: Path, **kwargs):
    from transformers import pipeline

    return pipeline(TASK, model=str(folder), trust_remote_code=True, **kwargs)


@pytest.fixture(scope="module", params=["headless", "map_head", "aimv2", "dinov3"])
def model_case(request, tmp_path_factory):
    """(folder, pipeline, reference features, reference pooled) for an Ovis-like headless model (RoPE, 2×2 token
    blocks), a naflex-like model with the MAP head (raster order), and converted AIMv2 (attention-pool head) and
    DINOv3 (CLS and registers inside each sequence, CLS pooled) folders."""
    base = tmp_path_factory.mktemp(request.param)
    if request.param in ("aimv2", "dinov3"):
        folder = Path(importlib.import_module(f"test_{request.param}").readme_folder(base))
    else:
        overrides = {"headless": {}, "map_head": {"vision_use_head": True, "use_rope": False, "hidden_stride": 1}}
        folder = converted_folder(base / "model", **overrides[request.param])
    features, pooled = references(folder)
    return folder, feature_pipeline(folder), features, pooled


def test_reference_token_counts_differ(model_case):
    """The test images must give different token counts, or a row-wise split could pass by luck."""
    _, _, features, _ = model_case
    counts = [f.shape[1] for f in features]
    assert len(set(counts)) == len(counts), counts


def test_folder_builds_the_packed_pipeline(model_case):
    _, pipe, _, _ = model_case
    assert type(pipe).__name__ == "NavitImageFeatureExtractionPipeline"


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("pool", [False, True])
def test_each_image_gets_its_own_features(model_case, batch_size, pool):
    _, pipe, features, pooled = model_case
    expected = pooled if pool else features
    out = pipe(images(), batch_size=batch_size, pool=pool, return_tensors=True, image_processor_kwargs=PROCESSOR_KWARGS)
    assert len(out) == len(expected)
    for i, (got, want) in enumerate(zip(out, expected)):
        assert isinstance(got, torch.Tensor)
        assert got.shape == want.shape, f"image {i}: {tuple(got.shape)} vs {tuple(want.shape)}"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"image {i}")  # fp32: packed vs alone


def test_lists_unless_return_tensors(model_case):
    _, pipe, features, pooled = model_case
    one = pipe(arrays()[2], image_processor_kwargs=PROCESSOR_KWARGS)  # a single input (any array): a single result
    assert isinstance(one, list) and isinstance(one[0][0], list)
    torch.testing.assert_close(torch.tensor(one), features[2], rtol=1e-4, atol=1e-4)
    many = pipe(images()[:3], batch_size=2, pool=True, image_processor_kwargs=PROCESSOR_KWARGS)
    assert all(isinstance(result, list) for result in many)
    for got, want in zip(many, pooled):
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-4)


def test_pipeline_options_at_construction(model_case):
    """Options given to `pipeline(...)` apply to every call, as in transformers' pipelines."""
    folder, _, _, pooled = model_case
    pipe = feature_pipeline(
        folder, pool=True, return_tensors=True, batch_size=3, image_processor_kwargs=PROCESSOR_KWARGS
    )
    for got, want in zip(pipe(images()), pooled):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_task_is_inferred_from_the_folder(model_case):
    """`custom_pipelines` has one task: `pipeline(model=folder, trust_remote_code=True)` needs no task name."""
    from transformers import pipeline

    folder, _, features, _ = model_case
    pipe = pipeline(model=str(folder), trust_remote_code=True)
    assert pipe.task == TASK
    got = pipe(images()[1], return_tensors=True, image_processor_kwargs=PROCESSOR_KWARGS)
    torch.testing.assert_close(got, features[1], rtol=1e-4, atol=1e-4)


def test_hub_like_folder(hub_folder):
    """A folder written by `save_pretrained` plus the remote-code files (conftest's Hub-like folder)."""
    from transformers import AutoImageProcessor

    model = tiny_model(patch_size=16, image_size=64, window_size=96)  # the repo's processor configs: 16-px patches
    model.config.custom_pipelines = utils.CUSTOM_PIPELINES
    folder = hub_folder(model)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    pipe = feature_pipeline(folder)
    small = {"min_pixels": 32 * 32, "max_pixels": 128 * 128}
    out = pipe(images(), batch_size=3, return_tensors=True, image_processor_kwargs=small)
    for image, got in zip(images(), out):
        with torch.no_grad():
            want = model(**processor(images=image, return_tensors="pt", **small)).last_hidden_state[None]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_in_memory_model(model_case):
    """The class also wraps a model and processor already in memory (no folder, no remote code)."""
    from transformers import AutoImageProcessor, AutoModel, pipeline

    from siglip2_navit.pipeline_navit import NavitImageFeatureExtractionPipeline

    folder, _, features, _ = model_case
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    pipe = pipeline(TASK, model=model, image_processor=processor, pipeline_class=NavitImageFeatureExtractionPipeline)
    out = pipe(images(), batch_size=4, return_tensors=True, image_processor_kwargs=PROCESSOR_KWARGS)
    for got, want in zip(out, features):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# bad input: a clear error before the model runs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def forward_calls(model_case):
    """Counts forward passes of the model case's pipeline model."""
    _, pipe, _, _ = model_case
    calls = []
    handle = pipe.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield pipe, calls
    handle.remove()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"pool": "yes"}, ValueError, r"`pool` must be one of \[True, False\], got 'yes'"),
        ({"return_tensors": "np"}, ValueError, r"`return_tensors` must be one of \[True, 'pt', False\], got 'np'"),
        ({"max_pixels": 448 * 448}, TypeError, r"unexpected option\(s\) \['max_pixels'\].*image_processor_kwargs"),
        ({"image_processor_kwargs": [("max_pixels", 1)]}, TypeError, r"`image_processor_kwargs` must be a dict"),
        ({"image_processor_kwargs": {"return_tensors": "np"}}, ValueError, r"must not set \['return_tensors'\]"),
    ],
)
def test_bad_options(forward_calls, kwargs, error, match):
    pipe, calls = forward_calls
    with pytest.raises(error, match=match):
        pipe(images(), batch_size=2, **kwargs)
    assert not calls


def test_batch_of_images_as_one_input(forward_calls):
    pipe, calls = forward_calls
    with pytest.raises(ValueError, match=r"must be one image; this one gave 2 images.*pass a list of images"):
        pipe(np.stack([arrays()[0]] * 2))
    assert not calls


def test_split_refuses_rows_that_do_not_match_the_grids():
    """A model whose output rows are not one per input patch (e.g. extra class tokens) gets a clear error, not a
    silently shifted split."""
    from siglip2_navit.pipeline_navit import split_packed_outputs

    grids = torch.tensor([[1, 2, 4], [1, 4, 4]])  # 8 + 16 tokens
    pieces = split_packed_outputs(torch.randn(24, 5), None, grids)["last_hidden_state"]
    assert [tuple(p.shape) for p in pieces] == [(8, 5), (16, 5)]
    with pytest.raises(ValueError, match=r"26 rows, but grid_thws describes 24 patches \(\[8, 16\] per image"):
        split_packed_outputs(torch.randn(26, 5), None, grids)


# ----------------------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------------------


def test_registration_is_consistent():
    """The repo's config.json, the converters' entry and the module agree; converted folders ship the module."""
    repo = json.loads((REPO_ROOT / "config.json").read_text(encoding="utf-8"))
    assert repo["custom_pipelines"] == utils.CUSTOM_PIPELINES
    module, cls = utils.CUSTOM_PIPELINES[TASK]["impl"].split(".")
    assert f"{module}.py" in utils.CODE_FILES
    from siglip2_navit import pipeline_navit

    assert pipeline_navit.__name__.rsplit(".", 1)[-1] == module and hasattr(pipeline_navit, cls)


def test_converted_folder_config(model_case):
    folder, _, _, _ = model_case
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["custom_pipelines"] == utils.CUSTOM_PIPELINES
    assert (folder / "pipeline_navit.py").read_bytes() == (REPO_ROOT / "pipeline_navit.py").read_bytes()
