# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Processor safety (issue 16): non-finite or degenerate normalisation settings are refused at construction, on
loading and on per-call overrides; strings are local paths only (a URL is refused, never fetched)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from siglip2_navit.image_processing_siglip2_navit import Siglip2NavitImageProcessor


ROOT = Path(__file__).resolve().parent.parent
IMAGE = np.full((32, 32, 3), 200, dtype=np.uint8)
SMALL = dict(patch_size=4, hidden_stride=2, min_pixels=8 * 8, max_pixels=32 * 32)

BAD_SETTINGS = [
    ({"image_std": float("nan")}, r"`image_std\[0\]` must be a finite number, got nan"),
    ({"image_std": [0.5, float("inf"), 0.5]}, r"`image_std\[1\]` must be a finite number, got inf"),
    ({"image_std": np.array([0.5, 0.5, -np.inf])}, r"`image_std\[2\]` must be a finite number"),
    ({"image_std": 0.0}, r"`image_std` must not contain zeros"),
    ({"image_std": [0.5, -0.5, 0.5]}, r"`image_std` must not contain zeros or negative values"),
    ({"image_mean": float("nan")}, r"`image_mean\[0\]` must be a finite number"),
    ({"image_mean": [0.5, "0.5", 0.5]}, r"`image_mean\[1\]` must be a finite number, got '0.5' of type str"),
    ({"image_mean": "abc"}, r"`image_mean\[0\]` must be a finite number, got 'abc'"),
    ({"rescale_factor": float("nan")}, r"`rescale_factor` must be a finite number, got nan"),
    ({"rescale_factor": float("-inf")}, r"`rescale_factor` must be a finite number, got -inf"),
    ({"rescale_factor": torch.tensor(float("nan"))}, r"`rescale_factor` must be a finite number, got nan"),
    ({"rescale_factor": 0}, r"`rescale_factor` must be positive, got 0.0"),
    ({"rescale_factor": True}, r"`rescale_factor` must be a finite number, got True of type bool"),
]


@pytest.mark.parametrize("settings, match", BAD_SETTINGS)
def test_bad_settings_are_refused_at_construction(settings, match):
    with pytest.raises(ValueError, match=match):
        Siglip2NavitImageProcessor(**SMALL, **settings)


@pytest.mark.parametrize("settings, match", BAD_SETTINGS)
def test_bad_settings_are_refused_as_per_call_overrides(settings, match):
    proc = Siglip2NavitImageProcessor(**SMALL)
    with pytest.raises(ValueError, match=match):
        proc(images=IMAGE, **settings)


def test_bad_settings_are_refused_when_loading(tmp_path):
    """Saved processor configs with NaN (Python's json writes and reads it) do not load."""
    Siglip2NavitImageProcessor(**SMALL).save_pretrained(tmp_path)
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = tmp_path / name
        config = json.loads(path.read_text())
        config.get("image_processor", config)["image_std"] = [0.5, float("nan"), 0.5]
        path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"`image_std\[1\]` must be a finite number"):
        Siglip2NavitImageProcessor.from_pretrained(tmp_path)


def test_settings_assigned_after_construction_are_checked_on_call():
    proc = Siglip2NavitImageProcessor(**SMALL)
    proc.rescale_factor = float("nan")
    with pytest.raises(ValueError, match=r"`rescale_factor` must be a finite number"):
        proc(images=IMAGE)


def test_valid_settings_still_normalise_as_specified():
    """Scalar and numpy settings are accepted and give (x * rescale - mean) / std, computed here independently."""
    proc = Siglip2NavitImageProcessor(**SMALL, image_mean=np.float32(0.25), image_std=[0.5, 0.25, 2.0])
    out = proc(images=IMAGE, rescale_factor=1 / 200, return_tensors="np")["pixel_values"]
    expected = (1.0 - 0.25) / np.array([0.5, 0.25, 2.0])  # per channel; columns are (channel, t, row, col)
    per_channel = out.reshape(out.shape[0], 3, -1)
    assert np.isfinite(out).all()
    for c in range(3):
        assert np.allclose(per_channel[:, c], expected[c], atol=1e-6), c


@pytest.mark.parametrize(
    "url", ["https://example.com/cat.png", "http://127.0.0.1:9/x.jpg", "ftp://host/img.png", "s3://bucket/img.jpg"]
)
def test_url_strings_are_refused_not_fetched(url, monkeypatch):
    import transformers.image_utils

    def no_fetch(*args, **kwargs):
        raise AssertionError("the processor fetched a URL")

    monkeypatch.setattr(transformers.image_utils, "load_image", no_fetch)
    proc = Siglip2NavitImageProcessor(**SMALL)
    for inputs in ({"images": url}, {"images": [IMAGE, url]}, {"videos": [[IMAGE, url]]}):
        with pytest.raises(ValueError, match=r"is a URL; URLs are not fetched .*local file paths.*PIL image"):
            proc(**inputs)


def test_local_paths_still_work(tmp_path):
    import PIL.Image

    PIL.Image.fromarray(IMAGE).save(tmp_path / "a.png")
    proc = Siglip2NavitImageProcessor(**SMALL)
    for image in (str(tmp_path / "a.png"), tmp_path / "a.png"):
        out = proc(images=image, return_tensors="np")
        assert np.array_equal(out["pixel_values"], proc(images=IMAGE, return_tensors="np")["pixel_values"])


def test_docs_say_urls_are_not_fetched():
    """docs/image_processor.md agrees with the code: strings are local paths, URLs are refused."""
    text = " ".join((ROOT / "docs" / "image_processor.md").read_text().split())
    assert "Strings are local file paths" in text
    assert "URLs (`http://`, `https://`, any `scheme://`) are not fetched" in text
