# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The processor's resize rules against the processors they reproduce: `"naflex"` against transformers'
`Siglip2ImageProcessor` (grid = `spatial_shapes`, patches equal), `"center_crop"` against `CLIPImageProcessor`
(the fixed-size preprocessing of AIMv2's 224-px checkpoints). Expected values come from transformers, never from
this repository's code."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siglip2_navit.image_processing_siglip2_navit import (
    Siglip2NavitImageProcessor,
    center_crop_plan,
    naflex_resize,
    naflex_to_packed,
)


ROOT = Path(__file__).resolve().parent.parent
# the sample photos shipped with the repository: 451x300, 640x427, 600x400 RGB; 512x512 L; 400x328 RGBA; 102x102 L
PHOTOS = ("examples/chelsea.png", "examples/rocket.jpg", "examples/coffee.png", "examples/camera.png",
          "examples/horse.png", "tests/fixtures/microaneurysms.png")
EXTREME_SIZES = ((1, 1), (50, 4000), (4000, 50))  # (width, height) of PIL images


def pil_processor(name: str):
    """transformers' PIL image processor `name` (5.x: `<name>Pil`; 4.x: `<name>` is the PIL one)."""
    import transformers

    module = {"Siglip2ImageProcessor": "siglip2", "CLIPImageProcessor": "clip"}[name]
    try:
        pil = __import__(f"transformers.models.{module}.image_processing_pil_{module}", fromlist=[name + "Pil"])
        return getattr(pil, name + "Pil")
    except ImportError:
        return getattr(transformers, name)


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def sample_images():
    """Photos and extreme sizes, all RGB (naflex composites transparency differently: not a resize question)."""
    images = [Image.open(ROOT / name).convert("RGB") for name in PHOTOS]
    images += [_noise(w, h, seed) for seed, (w, h) in enumerate(EXTREME_SIZES)]
    return images


# ----------------------------------------------------------------------------------------------------------------------
# naflex
# ----------------------------------------------------------------------------------------------------------------------


def test_naflex_resize_equals_transformers_rule():
    try:  # 5.x: the PIL backend's module (the other one needs torchvision)
        from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches
    except ImportError:  # 4.x
        from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches
    reference = get_image_size_for_max_num_patches
    rng = random.Random(0)
    sizes = [(1, 1), (4000, 50), (50, 4000), (300, 451), (600, 512), (1, 100000)]
    sizes += [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(400)]
    for height, width in sizes:
        for patch_size, max_num_patches in ((16, 256), (14, 1024), (16, 64), (16, 1)):
            assert naflex_resize(height, width, patch_size, max_num_patches) == reference(
                height, width, patch_size, max_num_patches
            ), (height, width, patch_size, max_num_patches)


@pytest.mark.parametrize("max_num_patches", [256, 64])
def test_naflex_rule_matches_siglip2_image_processor(max_num_patches):
    """Grid = naflex's `spatial_shapes` and the patch rows = naflex's patches (reordered by `naflex_to_packed`)."""
    images = sample_images()
    reference = pil_processor("Siglip2ImageProcessor")(patch_size=16, max_num_patches=max_num_patches)
    expected = reference(images, return_tensors="pt")
    processor = Siglip2NavitImageProcessor(resize_rule="naflex", hidden_stride=1, max_num_patches=256)
    ours = processor(images, max_num_patches=max_num_patches, return_tensors="pt")  # per-call budget, as naflex

    shapes = expected["spatial_shapes"].tolist()
    assert ours["grid_thws"].tolist() == [[1, h, w] for h, w in shapes]
    if max_num_patches == 256:
        assert shapes[len(PHOTOS)] == [7, 7]  # 1x1: naflex enlarges an image at most 100-fold
    rows, _ = naflex_to_packed(expected["pixel_values"], expected["pixel_attention_mask"], expected["spatial_shapes"])
    torch.testing.assert_close(ours["pixel_values"], rows.float(), atol=1e-6, rtol=0)


def test_naflex_rule_with_stride_2_runs_on_blocks():
    """hidden_stride 2: naflex's rule on 2x2 blocks of patches (even grids within the patch budget)."""
    processor = Siglip2NavitImageProcessor(resize_rule="naflex", hidden_stride=2, max_num_patches=256)
    for image in sample_images():
        _, h, w = processor(image)["grid_thws"][0].tolist()
        assert h % 2 == 0 and w % 2 == 0 and h * w <= 256
        assert (h // 2, w // 2) == tuple(s // 32 for s in naflex_resize(image.height, image.width, 32, 64))
    with pytest.raises(ValueError, match="at least hidden_stride"):
        Siglip2NavitImageProcessor(resize_rule="naflex", hidden_stride=2, max_num_patches=3)


def test_naflex_planning_api_agrees_with_processing():
    processor = Siglip2NavitImageProcessor(resize_rule="naflex", hidden_stride=1)
    for image in sample_images():
        grid = processor(image)["grid_thws"][0].tolist()
        assert processor.get_num_tokens(image.height, image.width).num_patches == grid[1] * grid[2]
        assert processor.target_size(image.height, image.width) == (grid[1] * 16, grid[2] * 16)
        count = processor.get_number_of_image_patches(image.height, image.width, {"max_num_patches": 64})
        assert count == int(np.prod(processor(image, max_num_patches=64)["grid_thws"][0]))


def test_rule_chosen_per_call_and_saved(tmp_path):
    ovis = Siglip2NavitImageProcessor()  # the Ovis default
    image = sample_images()[0]
    assert ovis(image)["grid_thws"].tolist() == [[1, 24, 36]]  # smart_resize: 451x300 -> 576x384
    naflex_grid = ovis(image, resize_rule="naflex", max_num_patches=256, hidden_stride=1)["grid_thws"].tolist()
    assert naflex_grid == [[1, 13, 19]]  # naflex's spatial_shapes of 451x300 at 256 patches
    naflex = Siglip2NavitImageProcessor(resize_rule="naflex", hidden_stride=1, max_num_patches=100)
    naflex.save_pretrained(tmp_path)
    loaded = Siglip2NavitImageProcessor.from_pretrained(tmp_path)
    assert (loaded.resize_rule, loaded.max_num_patches) == ("naflex", 100)
    with pytest.raises(ValueError, match="resize_rule"):
        Siglip2NavitImageProcessor(resize_rule="qwen")
    with pytest.raises(ValueError, match="resize_rule"):
        ovis(image, resize_rule="square")


# ----------------------------------------------------------------------------------------------------------------------
# center crop (CLIP / AIMv2 fixed-size checkpoints)
# ----------------------------------------------------------------------------------------------------------------------


CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _clip_rows(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """CLIP's `[B, C, H, W]` images -> packed rows, raster order, each flattened (channel, row, col)."""
    b, c, h, w = pixel_values.shape
    patches = pixel_values.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(-1, c * patch_size * patch_size)


@pytest.mark.parametrize("shortest_edge, crop", [(28, 28), (40, 28)])
def test_center_crop_rule_matches_clip_image_processor(shortest_edge, crop):
    images = sample_images()
    reference = pil_processor("CLIPImageProcessor")(
        size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop}, resample=3,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    expected = reference(images, return_tensors="pt")["pixel_values"]  # [B, 3, crop, crop]
    processor = Siglip2NavitImageProcessor(
        resize_rule="center_crop", shortest_edge=shortest_edge, crop_size=crop, patch_size=14, hidden_stride=1,
        resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    ours = processor(images, return_tensors="pt")
    assert ours["grid_thws"].tolist() == [[1, crop // 14, crop // 14]] * len(images)
    torch.testing.assert_close(ours["pixel_values"], _clip_rows(expected, 14).float(), atol=1e-5, rtol=0)


def test_center_crop_plan_geometry():
    plan = center_crop_plan(300, 451, 224, (224, 224))
    assert (plan.height, plan.width) == (224, int(224 * 451 / 300))
    assert plan.crop == (0, (plan.width - 224) // 2, 224, 224) and plan.size == (224, 224)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(resize_rule="center_crop"), "needs `shortest_edge`"),
        (dict(resize_rule="center_crop", shortest_edge=224, crop_size=256), "at most shortest_edge"),
        (dict(resize_rule="center_crop", shortest_edge=224, crop_size=(224, 200)), "multiples of patch_size"),
        (dict(resize_rule="center_crop", shortest_edge=224, crop_size={"h": 224}), "'height' and 'width'"),
        (dict(resize_rule="naflex", max_num_patches=0), "max_num_patches"),
    ],
)
def test_bad_rule_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Siglip2NavitImageProcessor(**{"patch_size": 16, "hidden_stride": 1, **settings})


# ----------------------------------------------------------------------------------------------------------------------
# the rule a conversion writes, from the source's preprocessor_config.json
# ----------------------------------------------------------------------------------------------------------------------


def test_conversion_settings_follow_the_source():
    from siglip2_navit.tools.resize_settings import fixed_size_settings, naflex_settings

    assert naflex_settings(None, 16) == {"resize_rule": "naflex", "max_num_patches": 256}
    assert naflex_settings({"max_num_patches": 1024, "patch_size": 16}, 16)["max_num_patches"] == 1024
    clip = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True}
    assert fixed_size_settings(clip, 224, 14) == {"resize_rule": "center_crop", "shortest_edge": 256,
                                                  "crop_size": [224, 224]}
    assert fixed_size_settings(None, 224, 14)["shortest_edge"] == 224
    with pytest.raises(ValueError, match="patch_size is 16"):
        naflex_settings({"patch_size": 14}, 16)
    with pytest.raises(ValueError, match="position table covers"):
        fixed_size_settings({"crop_size": 336}, 224, 14)
    with pytest.raises(ValueError, match="shortest-edge"):
        fixed_size_settings({"size": {"height": 224, "width": 224}, "do_center_crop": False}, 224, 14)
