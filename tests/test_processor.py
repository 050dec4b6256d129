"""Tests for image_processing_siglip2_navit: exactness, patch layout, smart_resize arithmetic, inputs, errors,
save/load, videos, token-budget packing and collation.

Expected values are computed independently (by hand, by transformers' SiglipImageProcessor, or by loops written
here), never copied from the module's own output.
"""

import json
import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from siglip2_navit.image_processing_siglip2_navit import (
    Siglip2NavitImageProcessor,
    TokenCount,
    collate_packed,
    pack_by_token_budget,
    sample_max_pixels,
    smart_resize,
)


ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = sorted(
    [p for p in (ROOT / "examples").iterdir() if p.suffix in (".jpg", ".png")]
    + [p for p in (ROOT / "tests" / "fixtures").iterdir() if p.suffix in (".jpg", ".png")]
)
FACTOR = 32
MIN_PIXELS = 448 * 448
MAX_PIXELS = 1792 * 1792


def _siglip_reference_class():
    """transformers' PIL (slow) SigLIP image processor, on 4.x and 5.x."""
    try:  # transformers 5.x: the PIL backend class
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        return SiglipImageProcessorPil
    except ImportError:  # transformers 4.x: SiglipImageProcessor is the PIL one
        from transformers import SiglipImageProcessor

        return SiglipImageProcessor


def _reference_pixels(rgb_image: PIL.Image.Image, height: int, width: int) -> np.ndarray:
    """[3, height, width] from transformers' SiglipImageProcessor with the Ovis2.5 settings."""
    reference = _siglip_reference_class()(
        size={"height": height, "width": width},
        resample=PIL.Image.Resampling.BILINEAR,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
    )
    return np.asarray(reference(rgb_image, return_tensors="np")["pixel_values"][0])


def _unpatchify(rows: np.ndarray, grid, patch_size: int, temporal_patch_size: int, stride: int) -> np.ndarray:
    """Rebuild [frames, C, H, W] from packed rows with explicit loops, following the packed layout literally."""
    t, h, w = (int(v) for v in grid)
    p, tp, s = patch_size, temporal_patch_size, stride
    channels = rows.shape[1] // (tp * p * p)
    out = np.full((t * tp, channels, h * p, w * p), np.nan, dtype=np.float64)
    k = 0
    for frame in range(t):
        for i in range(h // s):
            for j in range(w // s):
                for r in range(s):
                    for c in range(s):
                        row, col = i * s + r, j * s + c
                        patch = rows[k].reshape(channels, tp, p, p)  # (channel, temporal, row-in, col-in)
                        for dt in range(tp):
                            out[frame * tp + dt, :, row * p : (row + 1) * p, col * p : (col + 1) * p] = patch[:, dt]
                        k += 1
    assert k == rows.shape[0]
    assert not np.isnan(out).any()
    return out


def _independent_pixels(rgb_uint8: np.ndarray, height: int, width: int) -> np.ndarray:
    """[3, H, W] float64: PIL bilinear resize of the uint8 image, then (x / 255 - 0.5) / 0.5."""
    resized = np.asarray(PIL.Image.fromarray(rgb_uint8).resize((width, height), PIL.Image.Resampling.BILINEAR))
    return ((resized.astype(np.float64) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def proc():
    return Siglip2NavitImageProcessor()


# ----------------------------------------------------------------------------------------------------------------------
# exactness vs transformers' SiglipImageProcessor
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", REAL_IMAGES, ids=lambda p: p.name)
@pytest.mark.parametrize("budget", [None, (32 * 32, 256 * 256)], ids=["default", "small"])
def test_matches_siglip_image_processor(proc, path, budget):
    image = PIL.Image.open(path)
    kwargs = {} if budget is None else {"min_pixels": budget[0], "max_pixels": budget[1]}
    out = proc(images=image, return_tensors="np", **kwargs)
    t, h, w = out["grid_thws"][0]
    assert t == 1
    height, width = h * 16, w * 16
    assert (height, width) == proc.smart_resize(image.height, image.width, **kwargs)
    reference = _reference_pixels(image.convert("RGB"), height, width)
    ours = _unpatchify(out["pixel_values"], out["grid_thws"][0], 16, 1, 2)[0]
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-6


def test_real_images_in_one_call_equal_separate_calls(proc):
    images = [PIL.Image.open(p) for p in REAL_IMAGES]
    batch = proc(images=images, return_tensors="np")
    assert batch["grid_thws"].shape == (len(images), 3)
    separate = [proc(images=im, return_tensors="np") for im in images]
    np.testing.assert_array_equal(batch["pixel_values"], np.concatenate([s["pixel_values"] for s in separate]))
    np.testing.assert_array_equal(batch["grid_thws"], np.concatenate([s["grid_thws"] for s in separate]))


# ----------------------------------------------------------------------------------------------------------------------
# patch layout
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_patch_layout_unpatchifies_to_resized_image(stride):
    rgb = np.asarray(PIL.Image.open(ROOT / "examples" / "chelsea.png").convert("RGB"))
    proc = Siglip2NavitImageProcessor(patch_size=8, hidden_stride=stride, min_pixels=64 * 64, max_pixels=128 * 160)
    out = proc(images=rgb, return_tensors="np")
    t, h, w = out["grid_thws"][0]
    assert out["pixel_values"].shape == (t * h * w, 3 * 8 * 8)
    assert h % stride == 0 and w % stride == 0
    expected = _independent_pixels(rgb, h * 8, w * 8)
    rebuilt = _unpatchify(out["pixel_values"], out["grid_thws"][0], 8, 1, stride)[0]
    assert np.abs(rebuilt - expected).max() < 1e-6


def test_first_rows_follow_block_order():
    """With s = 2 the second row is patch (0, 1) and the third is patch (1, 0), checked by value."""
    proc = Siglip2NavitImageProcessor(patch_size=2, hidden_stride=2, min_pixels=16, max_pixels=64, do_normalize=False,
                                      do_rescale=False)
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    for r in range(4):
        for c in range(4):
            image[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = 10 * r + c  # every pixel of patch (r, c) = 10 r + c
    out = proc(images=image, return_tensors="np")
    assert out["grid_thws"].tolist() == [[1, 4, 4]]
    firsts = out["pixel_values"][:, 0].tolist()
    assert firsts == [0, 1, 10, 11, 2, 3, 12, 13, 20, 21, 30, 31, 22, 23, 32, 33]
    # Columns: (channel, temporal, row-in-patch, col-in-patch); a channel-dependent image checks the channel axis.
    image2 = np.zeros((8, 8, 3), dtype=np.uint8)
    image2[..., 1], image2[..., 2] = 100, 200
    row = proc(images=image2, return_tensors="np")["pixel_values"][0]
    assert row.tolist() == [0] * 4 + [100] * 4 + [200] * 4


# ----------------------------------------------------------------------------------------------------------------------
# smart_resize
# ----------------------------------------------------------------------------------------------------------------------

# (height, width) -> expected (height, width), worked out by hand from smart_resize with factor 32 and the default
# budget [448*448 = 200704, 1792*1792 = 3211264].
SMART_RESIZE_CASES = [
    # plain rounding: 427/32 = 13.34 -> 13 -> 416; 640/32 = 20 -> 640; area 266240 in budget
    ((427, 640), (416, 640)),
    # half to even: 464/32 = 14.5 -> 14 (448), 496/32 = 15.5 -> 16 (512); half-up would give 480
    ((464, 496), (448, 512)),
    # half to even: 528/32 = 16.5 -> 16 (512), 560/32 = 17.5 -> 18 (576)
    ((528, 560), (512, 576)),
    # floor branch: 3008*4000 > max; beta = sqrt(12e6 / 3211264) = 1.93309;
    # 3000/beta/32 = 48.50 -> 48 (1536); 4000/beta/32 = 64.66 -> 64 (2048)
    ((3000, 4000), (1536, 2048)),
    ((4000, 3000), (2048, 1536)),
    # ceil branch: 96*96 < min; beta = sqrt(200704/10404) = 448/102, but 102*beta = 448.00000000000006 in floating
    # point, so ceil(14.000000000000002) = 15 -> 480 (Ovis2.5's float arithmetic, not exact 448)
    ((102, 102), (480, 480)),
    # side < factor: h = 32, w = round(32/10*100) = 320; 32*320 < min; beta = sqrt(200704/10240) = 4.4272
    # (from the *updated* sides): ceil(4.43) = 5 -> 160, ceil(320*4.4272/32) = ceil(44.27) = 45 -> 1440
    ((10, 100), (160, 1440)),
    # side < factor, square: 32x32 -> 1024 < min; beta = sqrt(196) = 14 -> 448
    ((31, 31), (448, 448)),
    ((1, 1), (448, 448)),
    # aspect > 200: 9000/40 = 225 -> long side clamped to 200*40 = 8000; round(40/32) = 1 -> 32; 256000 in budget.
    # Without the clamp: round(9000/32) = 281 -> 8992.
    ((40, 9000), (32, 8000)),
    ((9000, 40), (8000, 32)),
    # 1x5000: Ovis2.5 gives (0, 126688) (w = 160000, beta = sqrt(5.12e6/3211264) = 1.26269, floor(0.79) = 0).
    # Guarantee: short side raised to 32, long side cut to the budget: 3211264 // 1024 = 3136 tiles -> 100352.
    ((1, 5000), (32, 100352)),
    ((5000, 1), (100352, 32)),
]


@pytest.mark.parametrize("size,expected", SMART_RESIZE_CASES, ids=[f"{h}x{w}" for (h, w), _ in SMART_RESIZE_CASES])
def test_smart_resize_table(proc, size, expected):
    assert smart_resize(size[0], size[1], FACTOR, MIN_PIXELS, MAX_PIXELS) == expected
    assert proc.smart_resize(*size) == expected


def test_smart_resize_custom_budget_by_hand():
    # 1000x1000 into exactly one tile: round(31.25) = 31 -> 992^2 > 1024; beta = 31.25; floor(1000/31.25/32) = 1
    assert smart_resize(1000, 1000, 32, 1024, 1024) == (32, 32)
    # 896*896 budget (Ovis2.5 video setting) for a 1080x1920 frame: 1088*1920 > max; beta = sqrt(2073600/802816)
    # = 1.60714; 1080/beta/32 = 21.0 -> 21 (672); 1920/beta/32 = 37.33 -> 37 (1184)
    assert smart_resize(1080, 1920, 32, 448 * 448, 896 * 896) == (672, 1184)


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1), (31, 31), (4000, 3000)])
def test_extreme_sizes_through_processor(proc, size):
    height, width = size
    image = (np.arange(height * width * 3, dtype=np.int64) % 251).astype(np.uint8).reshape(height, width, 3)
    out = proc(images=image, return_tensors="np")
    t, h, w = (int(v) for v in out["grid_thws"][0])
    assert t == 1 and h >= 2 and w >= 2 and h % 2 == 0 and w % 2 == 0  # sides >= factor, whole 2x2 blocks
    assert (h * 16) * (w * 16) <= MAX_PIXELS
    assert out["pixel_values"].shape == (h * w, 768)
    assert (h * 16, w * 16) == dict(SMART_RESIZE_CASES).get(size, (h * 16, w * 16))


@given(
    height=st.integers(1, 20000),
    width=st.integers(1, 20000),
    min_side=st.integers(2, 64),
    extra=st.integers(0, 4096),
)
@settings(max_examples=300, deadline=None)
def test_smart_resize_properties(height, width, min_side, extra):
    min_pixels = (min_side * 16) ** 2
    max_pixels = min_pixels + extra * 1024
    h, w = smart_resize(height, width, 32, min_pixels, max_pixels)
    assert h >= 32 and w >= 32 and h % 32 == 0 and w % 32 == 0
    if min(height, width) >= 32 and max(height, width) <= 200 * min(height, width):
        # Ovis2.5's branches: the area only exceeds max_pixels through the ceil (upscale) branch
        rounded_area = round(height / 32) * 32 * round(width / 32) * 32
        assert h * w <= max_pixels or rounded_area < min_pixels
        if rounded_area <= max_pixels and rounded_area >= min_pixels:
            assert (h, w) == (round(height / 32) * 32, round(width / 32) * 32)


def spec_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """smart_resize steps 1-3 (aspect clamp, rounding, budget) as Ovis2.5 writes them; a side may be < `factor`."""
    if min(height, width) < factor:
        if height <= width:
            height, width = factor, round(factor / height * width)
        else:
            height, width = round(factor / width * height), factor
    elif max(height, width) / min(height, width) > 200:
        if height > width:
            height = 200 * width
        else:
            width = 200 * height
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@given(
    height=st.one_of(st.integers(1, 200), st.integers(1, 30000)),
    width=st.one_of(st.integers(1, 200), st.integers(1, 30000)),
    factor=st.sampled_from([14, 16, 28, 32]),
    min_tiles=st.integers(1, 400),
    extra_tiles=st.integers(0, 4000),
)
@settings(max_examples=1500, deadline=None)
def test_smart_resize_equals_spec_formula(height, width, factor, min_tiles, extra_tiles):
    """Every branch (small side, aspect clamp, plain rounding, floor and ceil budgets) against Ovis2.5's math; where
    that arithmetic yields a side below `factor`, the documented guarantee applies instead."""
    min_pixels = min_tiles * factor * factor
    max_pixels = min_pixels + extra_tiles * factor * factor
    got = smart_resize(height, width, factor, min_pixels, max_pixels)
    want = spec_smart_resize(height, width, factor, min_pixels, max_pixels)
    if min(want) >= factor:
        assert got == want
    else:
        assert min(got) >= factor and got[0] % factor == 0 and got[1] % factor == 0 and got[0] * got[1] <= max_pixels


def test_get_num_tokens(proc):
    # 427x640 -> 416x640 -> 26x40 patches = 1040, 260 merged tokens (by hand)
    assert proc.get_num_tokens(427, 640) == TokenCount(1040, 260)
    assert proc.get_num_tokens(427, 640).num_patches == 1040
    # max_pixels override: 896*896 for 1080x1920 -> 672x1184 -> 42*74 = 3108 patches, 777 tokens
    assert proc.get_num_tokens(1080, 1920, max_pixels=896 * 896) == (3108, 777)
    video_proc = Siglip2NavitImageProcessor(temporal_patch_size=2)
    # 5 frames -> padded to 6 -> t = 3
    assert video_proc.get_num_tokens(427, 640, num_frames=5) == (3 * 1040, 3 * 260)
    for path in REAL_IMAGES:
        image = PIL.Image.open(path)
        out = proc(images=image, return_tensors="np")
        assert proc.get_num_tokens(image.height, image.width).num_patches == out["pixel_values"].shape[0]
    assert proc.get_number_of_image_patches(427, 640, {}) == 1040


# ----------------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------------


def _process(proc, image, **kwargs):
    return proc(images=image, return_tensors="np", min_pixels=32 * 32, max_pixels=96 * 128, **kwargs)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "1"])
def test_pil_modes_follow_convert_rgb(mode):
    proc = Siglip2NavitImageProcessor()
    base = PIL.Image.open(ROOT / "examples" / "horse.png")  # RGBA with transparency
    image = base.convert(mode)
    ours = _process(proc, image)
    expected = _process(proc, np.asarray(image.convert("RGB")))
    np.testing.assert_array_equal(ours["pixel_values"], expected["pixel_values"])


def test_rgba_drops_alpha_like_pil():
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent red stays red (convert("RGB") semantics, not white compositing)
    out = _process(Siglip2NavitImageProcessor(), PIL.Image.fromarray(rgba, "RGBA"))
    red = out["pixel_values"][:, :256]
    np.testing.assert_allclose(red, (200 / 255 - 0.5) / 0.5, atol=1e-6)


def test_i16_image_is_scaled_to_8_bits():
    gray = np.asarray(PIL.Image.open(ROOT / "examples" / "camera.png").convert("L"))
    wide = PIL.Image.fromarray(gray.astype(np.uint16) * 257)  # 16-bit, same picture
    assert wide.mode == "I;16"
    proc = Siglip2NavitImageProcessor()
    ours = _process(proc, wide)
    expected = _process(proc, PIL.Image.fromarray(gray, "L"))
    np.testing.assert_array_equal(ours["pixel_values"], expected["pixel_values"])
    # plain PIL convert("RGB") would clip almost everything to white; ours keeps the contrast
    assert ours["pixel_values"].std() > 0.3


def test_sixteen_bit_float_and_bool_inputs_map_to_eight_bits():
    """Wide and odd dtypes against the 8-bit image they encode (the uint8 pipeline): uint16 of either byte order
    and PIL I / I;16 as round(v / 257), PIL I with values <= 255 as is, float [0, 1] and PIL F as round(v · 255), bool as
    {0, 255}."""
    proc = Siglip2NavitImageProcessor()
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, size=(40, 56), dtype=np.uint8)
    expected = _process(proc, PIL.Image.fromarray(gray, "L"))["pixel_values"]
    wide = gray.astype(np.uint16) * 257
    variants = {
        "uint16": wide,
        "uint16 big-endian": wide.astype(">u2"),
        "PIL I;16": PIL.Image.fromarray(wide),
        "PIL I (> 255)": PIL.Image.fromarray(wide.astype(np.int32), "I"),
        "PIL I (<= 255)": PIL.Image.fromarray(gray.astype(np.int32), "I"),
        "float32 [0, 1]": gray.astype(np.float32) / 255,
        "PIL F [0, 1]": PIL.Image.fromarray(gray.astype(np.float32) / 255, "F"),
        "PIL F [0, 255]": PIL.Image.fromarray(gray.astype(np.float32), "F"),
    }
    for name, value in variants.items():
        np.testing.assert_array_equal(_process(proc, value)["pixel_values"], expected, err_msg=name)
    mask = gray > 127
    np.testing.assert_array_equal(
        _process(proc, mask)["pixel_values"],
        _process(proc, PIL.Image.fromarray(mask.astype(np.uint8) * 255, "L"))["pixel_values"],
    )


def test_channel_axis_is_inferred_like_transformers():
    """1 or 3 at exactly one end marks the channels (a (3, 64, 4) array is a 3-channel 64×4 image, not a 3×64 RGBA
    one); 4 counts only when neither end is 1 or 3; both ends 1 or 3 is ambiguous (numpy HWC, tensors CHW, warned)."""
    from transformers.testing_utils import CaptureLogger

    from siglip2_navit import navit_image_utils as module

    proc = Siglip2NavitImageProcessor()
    rng = np.random.default_rng(6)
    chw = rng.integers(0, 256, size=(3, 64, 4), dtype=np.uint8)
    np.testing.assert_array_equal(
        _process(proc, chw)["pixel_values"], _process(proc, chw.transpose(1, 2, 0).copy())["pixel_values"]
    )
    rgba = rng.integers(0, 256, size=(4, 40, 40), dtype=np.uint8)  # CHW RGBA: alpha dropped
    np.testing.assert_array_equal(
        _process(proc, rgba)["pixel_values"], _process(proc, rgba[:3].transpose(1, 2, 0).copy())["pixel_values"]
    )
    cube = rng.integers(0, 256, size=(3, 40, 3), dtype=np.uint8)
    module.logger.warning_once.cache_clear()
    with CaptureLogger(module.logger) as captured:
        as_hwc = _process(proc, cube)["pixel_values"]
    assert "ambiguous" in captured.out
    np.testing.assert_array_equal(as_hwc, _process(proc, cube, input_data_format="channels_last")["pixel_values"])
    np.testing.assert_array_equal(
        _process(proc, torch.from_numpy(cube))["pixel_values"],
        _process(proc, cube, input_data_format="channels_first")["pixel_values"],
    )


def test_a_bad_input_anywhere_raises_before_any_image_is_resized(monkeypatch):
    """Every image and frame of the call is decoded and checked before the first one is resized and patchified."""
    proc = Siglip2NavitImageProcessor()

    def no_compute(*args, **kwargs):
        raise AssertionError("an image was processed before the bad input was found")

    monkeypatch.setattr(Siglip2NavitImageProcessor, "_patchify", staticmethod(no_compute))
    good = np.zeros((64, 64, 3), dtype=np.uint8)
    bad_inputs = {
        "NaN image last": dict(images=[good, good, np.full((8, 8, 3), np.nan)]),
        "missing file last": dict(images=[good, "/nonexistent/image.png"]),
        "bad video frame": dict(images=[good], videos=[[good, np.full((8, 8, 3), 2.0)]]),
        "not divisible, do_resize=False": dict(images=[good, np.zeros((50, 64, 3), np.uint8)], do_resize=False),
    }
    for name, kwargs in bad_inputs.items():
        with pytest.raises(ValueError):
            proc(**kwargs)


def test_array_and_tensor_inputs_match_pil():
    rgb_image = PIL.Image.open(ROOT / "examples" / "rocket.jpg").convert("RGB")
    hwc = np.asarray(rgb_image)
    proc = Siglip2NavitImageProcessor()
    expected = _process(proc, rgb_image)
    variants = {
        "hwc_uint8": hwc,
        "chw_uint8": hwc.transpose(2, 0, 1).copy(),
        "hwc_float": hwc.astype(np.float32) / 255.0,
        "chw_float64": hwc.transpose(2, 0, 1).astype(np.float64) / 255.0,
        "torch_chw_uint8": torch.from_numpy(hwc.transpose(2, 0, 1).copy()),
        "torch_chw_float": torch.from_numpy(hwc.transpose(2, 0, 1).copy()).float() / 255.0,
        "torch_hwc_uint8": torch.from_numpy(hwc.copy()),
    }
    for name, value in variants.items():
        got = _process(proc, value)
        np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"], err_msg=name)
        np.testing.assert_array_equal(got["grid_thws"], expected["grid_thws"], err_msg=name)
    # greyscale 2-D and 1-channel arrays = L image
    gray = np.asarray(rgb_image.convert("L"))
    expected_gray = _process(proc, rgb_image.convert("L"))
    for value in (gray, gray[:, :, None], gray[None], torch.from_numpy(gray.copy())):
        np.testing.assert_array_equal(_process(proc, value)["pixel_values"], expected_gray["pixel_values"])
    # a 4-D array is a batch of images; nested lists are flattened
    batch = _process(proc, np.stack([hwc, hwc]))
    assert batch["grid_thws"].shape == (2, 3)
    nested = _process(proc, [[hwc], [hwc]])
    np.testing.assert_array_equal(nested["pixel_values"], batch["pixel_values"])


def test_file_path_input(proc):
    path = ROOT / "examples" / "coffee.png"
    from_path = proc(images=str(path), return_tensors="np")
    from_pil = proc(images=PIL.Image.open(path), return_tensors="np")
    np.testing.assert_array_equal(from_path["pixel_values"], from_pil["pixel_values"])


def test_return_tensors(proc):
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    for return_tensors in (None, "np"):
        out = proc(images=image, return_tensors=return_tensors)
        assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].dtype == np.float32
        assert isinstance(out["grid_thws"], np.ndarray) and out["grid_thws"].dtype == np.int64
    out = proc(images=[image, image], return_tensors="pt")
    assert out["pixel_values"].dtype == torch.float32 and out["grid_thws"].dtype == torch.int64
    assert out["pixel_values"].shape[1] == 768 and tuple(out["grid_thws"].shape) == (2, 3)
    assert list(out.keys()) == proc.model_input_names


def test_per_call_overrides(proc):
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    raw = proc(images=image, do_rescale=False, do_normalize=False, min_pixels=1024, max_pixels=64 * 64)
    assert raw["grid_thws"].tolist() == [[1, 4, 4]]
    assert np.all(raw["pixel_values"] == 255.0)
    custom = proc(images=image, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 2.0, 4.0], min_pixels=1024,
                  max_pixels=64 * 64)
    per_channel = custom["pixel_values"].reshape(-1, 3, 256)
    np.testing.assert_allclose(per_channel[:, 0], 1.0)
    np.testing.assert_allclose(per_channel[:, 1], 0.5)
    np.testing.assert_allclose(per_channel[:, 2], 0.25)
    # Qwen2-VL style `size` alias
    aliased = proc(images=image, size={"shortest_edge": 1024, "longest_edge": 64 * 64})
    assert aliased["grid_thws"].tolist() == [[1, 4, 4]]
    # do_resize=False keeps the size when it is a multiple of the factor
    kept = proc(images=np.zeros((64, 96, 3), dtype=np.uint8), do_resize=False)
    assert kept["grid_thws"].tolist() == [[1, 4, 6]]


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------------------------

GOOD = np.zeros((64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p: p(images=GOOD, min_pixels=5000, max_pixels=4000), r"min_pixels.*must not be larger.*max_pixels"),
        (lambda p: p(images=GOOD, max_pixels=100000), r"min_pixels.*200704.*max_pixels.*100000.*pass a smaller `min_pixels`"),
        (lambda p: p(images=GOOD, min_pixels=0), r"min_pixels.*positive"),
        (lambda p: p(images=GOOD, max_pixels=-5, min_pixels=1), r"max_pixels.*positive"),
        (lambda p: p(images=GOOD, min_pixels=100, max_pixels=1000), r"max_pixels.*too small.*32x32.*1024"),
        (lambda p: p(images=[]), r"empty list of images"),
        (lambda p: p(videos=[]), r"empty list of videos"),
        (lambda p: p(videos=[[]]), r"video with no frames"),
        (lambda p: p(), r"images.*videos"),
        (lambda p: p(images=np.zeros((0, 10, 3), dtype=np.uint8)), r"empty \(0-sized\)"),
        (lambda p: p(images=np.zeros((10, 0), dtype=np.uint8)), r"empty \(0-sized\)"),
        (lambda p: p(images=PIL.Image.new("RGB", (0, 5))), r"empty image"),
        (lambda p: p(images=np.zeros((10, 10, 2), dtype=np.uint8)), r"(?is)cannot read.*image.*1, 3 or 4 channels"),
        (lambda p: p(images=np.zeros((10, 10, 5), dtype=np.uint8)), r"(?is)cannot read.*1, 3 or 4 channels"),
        (lambda p: p(images=np.zeros((2, 10, 10), dtype=np.uint8)), r"(?is)cannot read.*1, 3 or 4 channels"),
        (lambda p: p(images=np.zeros((2, 3, 10, 10, 3), dtype=np.uint8)), r"2, 3 .*or 4 .*dimensions"),
        (lambda p: p(images=np.full((10, 10, 3), 2.0)), r"\[0, 1\]"),
        (lambda p: p(images=np.full((10, 10, 3), np.nan)), r"NaN"),
        (lambda p: p(images=np.full((10, 10, 3), 300, dtype=np.int32)), r"\[0, 255\]"),
        (lambda p: p(images=GOOD, return_tensors="tf"), r"return_tensors"),
        (lambda p: p(images=GOOD, image_mean=[0.5, 0.5]), r"image_mean.*3 values"),
        (lambda p: p(images=GOOD, image_std=[0.5, 0.0, 0.5]), r"image_std.*zeros"),
        (lambda p: p(images=GOOD, resample=99), r"resample"),
        (lambda p: p(images=GOOD, patch_size=0), r"patch_size.*positive"),
        (lambda p: p(images=np.zeros((50, 64, 3), dtype=np.uint8), do_resize=False), r"multiples of .*32"),
        (lambda p: p(images=GOOD, size={"height": 10, "width": 10}), r"size.*keys"),
        (lambda p: p(images=GOOD, size={"min_pixels": 1024, "max_pixels": 4096}, max_pixels=8192), r"disagrees"),
        (lambda p: p(images=3.5), r"Unsupported `images` type"),
        (lambda p: p(images=["/nonexistent/image.png"]), r"does not exist"),
        (lambda p: p(videos=[GOOD, [GOOD]]), r"mixing frames and videos"),
        (lambda p: p(videos=np.zeros((2, 4, 4), dtype=np.uint8)), r"4 dimensions"),
        (lambda p: p.smart_resize(0, 10), r"height.*positive"),
        (lambda p: p.get_num_tokens(10, 10, num_frames=0), r"num_frames.*positive"),
        (lambda p: smart_resize(10, 10, 32, 2000, 1000), r"must not be larger"),
        (lambda p: smart_resize(10.5, 10, 32, 1000, 2000), r"height.*integer"),
        (lambda p: Siglip2NavitImageProcessor(min_pixels=10, max_pixels=5), r"must not be larger"),
        (lambda p: Siglip2NavitImageProcessor(hidden_stride=0), r"hidden_stride.*positive"),
    ],
)
def test_bad_inputs_raise_value_error(proc, call, match):
    with pytest.raises(ValueError, match=match):
        call(proc)


def test_decompression_bomb_is_refused_by_pil(proc, monkeypatch, tmp_path):
    path = tmp_path / "bomb.png"
    shutil.copy(ROOT / "tests" / "fixtures" / "microaneurysms.png", path)  # 102 x 102 = 10404 pixels
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # > 2x the limit -> DecompressionBombError
    with pytest.raises(PIL.Image.DecompressionBombError):
        proc(images=str(path))
    with pytest.raises(PIL.Image.DecompressionBombError):
        PIL.Image.open(path)


# ----------------------------------------------------------------------------------------------------------------------
# videos
# ----------------------------------------------------------------------------------------------------------------------


def _frames(n, height=64, width=96):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(n)]


def test_video_frames_padded_to_temporal_patch_size():
    proc = Siglip2NavitImageProcessor(temporal_patch_size=2, min_pixels=32 * 32, max_pixels=64 * 96)
    frames = _frames(3)
    out = proc(videos=[frames], return_tensors="np")
    t, h, w = out["grid_thws"][0]
    assert (t, h, w) == (2, 4, 6)
    assert out["pixel_values"].shape == (2 * 4 * 6, 3 * 2 * 16 * 16)
    rebuilt = _unpatchify(out["pixel_values"], out["grid_thws"][0], 16, 2, 2)
    assert rebuilt.shape[0] == 4  # 3 frames + the last one repeated
    for i, frame in enumerate(frames + [frames[-1]]):
        np.testing.assert_allclose(rebuilt[i], _independent_pixels(frame, 64, 96), atol=1e-6)
    # the same video as a [T, H, W, C] array and as a bare list of frames
    np.testing.assert_array_equal(proc(videos=np.stack(frames), return_tensors="np")["pixel_values"],
                                  out["pixel_values"])
    np.testing.assert_array_equal(proc(videos=frames, return_tensors="np")["pixel_values"], out["pixel_values"])


@pytest.mark.parametrize("num_frames, tps", [(4, 3), (5, 4), (3, 3)])
def test_video_padding_repeats_the_last_frame_up_to_a_multiple(num_frames, tps):
    proc = Siglip2NavitImageProcessor(temporal_patch_size=tps, min_pixels=32 * 32, max_pixels=64 * 96)
    frames = _frames(num_frames)
    out = proc(videos=[frames], return_tensors="np")
    padded = -(-num_frames // tps) * tps  # ceil to a multiple of tps
    assert tuple(out["grid_thws"][0]) == (padded // tps, 4, 6)
    rebuilt = _unpatchify(out["pixel_values"], out["grid_thws"][0], 16, tps, 2)
    assert rebuilt.shape[0] == padded
    for i, frame in enumerate(frames + [frames[-1]] * (padded - num_frames)):
        np.testing.assert_allclose(rebuilt[i], _independent_pixels(frame, 64, 96), atol=1e-6)


def test_video_batches_as_five_dimensional_arrays():
    proc = Siglip2NavitImageProcessor(min_pixels=32 * 32, max_pixels=64 * 96)
    videos = np.stack([np.stack(_frames(2)), np.stack(_frames(2))[::-1]])  # [2 videos, 2 frames, H, W, C]
    as_lists = proc(videos=[list(v) for v in videos], return_tensors="np")
    for value in (videos, [videos]):
        got = proc(videos=value, return_tensors="np")
        np.testing.assert_array_equal(got["pixel_values"], as_lists["pixel_values"])
        np.testing.assert_array_equal(got["grid_thws"], as_lists["grid_thws"])
    with pytest.raises(ValueError, match="empty batch of videos"):
        proc(videos=np.zeros((0, 2, 8, 8, 3), dtype=np.uint8))


def test_video_mismatched_frames_resized_to_first_frame_target():
    proc = Siglip2NavitImageProcessor(min_pixels=32 * 32, max_pixels=64 * 96)
    first, other = _frames(1, 64, 96)[0], _frames(1, 50, 40)[0]
    out = proc(videos=[[first, other]], return_tensors="np")
    assert out["grid_thws"].tolist() == [[2, 4, 6]]
    rebuilt = _unpatchify(out["pixel_values"], out["grid_thws"][0], 16, 1, 2)
    np.testing.assert_allclose(rebuilt[0], _independent_pixels(first, 64, 96), atol=1e-6)
    np.testing.assert_allclose(rebuilt[1], _independent_pixels(other, 64, 96), atol=1e-6)


def test_mixed_images_and_videos_order():
    proc = Siglip2NavitImageProcessor(min_pixels=32 * 32, max_pixels=64 * 96)
    a, b = _frames(1, 64, 64)[0], _frames(1, 32, 96)[0]
    video = _frames(2, 64, 96)
    out = proc(images=[a, b], videos=[video], return_tensors="np")
    assert out["grid_thws"].tolist() == [[1, 4, 4], [1, 2, 6], [2, 4, 6]]
    parts = [proc(images=a), proc(images=b), proc(videos=[video])]
    np.testing.assert_array_equal(out["pixel_values"], np.concatenate([p["pixel_values"] for p in parts]))


# ----------------------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------------------


def _hub_like_folder(tmp_path) -> Path:
    folder = tmp_path / "hub_folder"
    folder.mkdir()
    for name in ("image_processing_siglip2_navit.py", "navit_image_utils.py", "navit_batching.py",
                 "preprocessor_config.json", "processor_config.json"):
        shutil.copy(ROOT / name, folder / name)
    return folder


def test_root_json_files_hold_identical_defaults():
    pre = json.loads((ROOT / "preprocessor_config.json").read_text())
    nested = json.loads((ROOT / "processor_config.json").read_text())["image_processor"]
    assert pre == nested
    assert pre["image_processor_type"] == "Siglip2NavitImageProcessor"
    assert pre["auto_map"] == {"AutoImageProcessor": "image_processing_siglip2_navit.Siglip2NavitImageProcessor"}
    expected = {"patch_size": 16, "temporal_patch_size": 1, "hidden_stride": 2, "min_pixels": 200704,
                "max_pixels": 3211264, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True}
    for key, value in expected.items():
        assert pre[key] == value, key
    assert math.isclose(pre["rescale_factor"], 1 / 255)
    # processor settings agree with the model config
    config = json.loads((ROOT / "config.json").read_text())
    for key in ("patch_size", "temporal_patch_size", "hidden_stride"):
        assert pre[key] == config[key], key


def test_auto_image_processor_round_trip(tmp_path):
    from transformers import AutoImageProcessor

    folder = _hub_like_folder(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=True)
    assert type(loaded).__name__ == "Siglip2NavitImageProcessor"
    assert (loaded.patch_size, loaded.temporal_patch_size, loaded.hidden_stride) == (16, 1, 2)
    assert (loaded.min_pixels, loaded.max_pixels) == (448 * 448, 1792 * 1792)
    image = PIL.Image.open(ROOT / "examples" / "horse.png")
    np.testing.assert_array_equal(
        loaded(images=image, return_tensors="np")["pixel_values"],
        Siglip2NavitImageProcessor()(images=image, return_tensors="np")["pixel_values"],
    )

    # change settings, save, reload: both files agree and carry the new values
    loaded.max_pixels = 896 * 896
    out = tmp_path / "saved"
    loaded.save_pretrained(str(out))
    pre = json.loads((out / "preprocessor_config.json").read_text())
    nested = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert pre == nested and pre["max_pixels"] == 896 * 896
    assert (out / "image_processing_siglip2_navit.py").is_file()
    assert pre["auto_map"]["AutoImageProcessor"] == "image_processing_siglip2_navit.Siglip2NavitImageProcessor"
    again = AutoImageProcessor.from_pretrained(str(out), trust_remote_code=True)
    assert again.max_pixels == 896 * 896 and again.to_dict() == loaded.to_dict()

    # from_pretrained kwargs override stored values
    override = AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=True, max_pixels=512 * 512)
    assert override.max_pixels == 512 * 512


def test_save_pretrained_without_auto_class_and_existing_processor_config(tmp_path):
    proc = Siglip2NavitImageProcessor(min_pixels=1024, max_pixels=65536)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Other", "image_processor": {}}))
    proc.save_pretrained(str(tmp_path))
    content = json.loads((tmp_path / "processor_config.json").read_text())
    assert content["processor_class"] == "Other"  # unrelated keys kept
    assert content["image_processor"] == json.loads((tmp_path / "preprocessor_config.json").read_text())
    reloaded = Siglip2NavitImageProcessor.from_pretrained(str(tmp_path))
    assert (reloaded.min_pixels, reloaded.max_pixels) == (1024, 65536)


def test_save_pretrained_with_push_to_hub_uploads_both_config_files(tmp_path, monkeypatch):
    """push_to_hub uploads what changed since the save began: processor_config.json must be among it, or a Hub repo
    that already has one (loaders prefer it) would keep stale settings. Network calls are stubbed."""
    import types

    from transformers import image_processing_base

    uploaded = []

    def record_upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded.extend(
            name
            for name in os.listdir(working_dir)
            if name not in files_timestamps or os.path.getmtime(os.path.join(working_dir, name)) > files_timestamps[name]
        )

    repo = types.SimpleNamespace(create_repo=lambda repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(image_processing_base, "hf_api", lambda: repo, raising=False)  # transformers 5.x
    monkeypatch.setattr(Siglip2NavitImageProcessor, "_create_repo", lambda self, repo_id, **kw: repo_id, raising=False)
    monkeypatch.setattr(Siglip2NavitImageProcessor, "_upload_modified_files", record_upload)

    folder = _hub_like_folder(tmp_path)
    past = os.path.getmtime(folder / "processor_config.json") - 60
    for name in os.listdir(folder):  # an earlier download of the repo
        os.utime(folder / name, (past, past))
    processor = Siglip2NavitImageProcessor(max_pixels=896 * 896)
    processor.save_pretrained(str(folder), push_to_hub=True, repo_id="someone/siglip2-navit")
    assert {"preprocessor_config.json", "processor_config.json"} <= set(uploaded)
    nested = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    assert nested["max_pixels"] == 896 * 896


def test_auto_image_processor_on_repo_root():
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(ROOT), trust_remote_code=True)
    assert type(proc).__name__ == "Siglip2NavitImageProcessor"
    assert proc.to_dict() == Siglip2NavitImageProcessor.from_pretrained(str(ROOT)).to_dict()


# ----------------------------------------------------------------------------------------------------------------------
# token-budget packing
# ----------------------------------------------------------------------------------------------------------------------


def _plain_first_fit(counts, budget):
    """First fit in the given order, written independently (O(n * groups))."""
    groups, totals = [], []
    for i, c in enumerate(counts):
        for g, total in enumerate(totals):
            if c <= budget and total + c <= budget:
                groups[g].append(i)
                totals[g] += c
                break
        else:
            groups.append([i])
            totals.append(c if c <= budget else budget + 1)  # oversize: closed
    return groups


def test_pack_by_token_budget_by_hand():
    # FFD: 9(#4) -> A; 8(#2) -> B; 5(#0) -> C; 3(#1) -> C (8); 2(#3) -> B (10); 1(#5) -> A (10)
    assert pack_by_token_budget([5, 3, 8, 2, 9, 1], 10) == [[0, 1], [2, 3], [4, 5]]
    # oversize items are alone; the rest packs around them
    assert pack_by_token_budget([4, 50, 4, 30, 2], 10) == [[0, 2, 4], [1], [3]]
    # FFD would need 3 groups here (6+4 | 4+3+3 | 3) but first fit in the given order needs 2:
    # 3 -> A, 6 -> A (9), 4 -> B, 3 -> A (12), 4 -> B (8), 3 -> B (11); the better packing is returned
    assert pack_by_token_budget([3, 6, 4, 3, 4, 3], 12) == [[0, 1, 3], [2, 4, 5]]
    assert pack_by_token_budget([], 10) == []
    assert pack_by_token_budget(np.array([3, 3, 3]), 6) == [[0, 1], [2]]
    assert pack_by_token_budget(torch.tensor([7]), 6) == [[0]]


@pytest.mark.parametrize(
    "args,match",
    [
        (([1, 2], 0), r"max_tokens.*positive"),
        (([1, 2], -3), r"max_tokens.*positive"),
        (([1, 2], 2.5), r"max_tokens.*integer"),
        (([1, -2], 5), r"token_counts\[1\].*non-negative"),
        (([1, "a"], 5), r"token_counts\[1\].*integer"),
        ((5, 5), r"sequence of integers"),
        ((np.ones((2, 2), dtype=int), 5), r"1-D"),
    ],
)
def test_pack_by_token_budget_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        pack_by_token_budget(*args)


@given(counts=st.lists(st.integers(0, 120), max_size=60), budget=st.integers(1, 100))
@settings(max_examples=400, deadline=None)
def test_pack_by_token_budget_properties(counts, budget):
    groups = pack_by_token_budget(counts, budget)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(counts)))  # every index exactly once
    for g in groups:
        assert g == sorted(g)  # order kept within a group
        total = sum(counts[i] for i in g)
        if total > budget:
            assert len(g) == 1 and counts[g[0]] > budget  # only a lone oversize item may exceed
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert len(groups) <= len(_plain_first_fit(counts, budget))
    # never worse than the trivial lower bound either way: at least ceil(sum of fitting items / budget) groups
    fitting = sum(c for c in counts if c <= budget)
    assert len(groups) >= math.ceil(fitting / budget) if counts else groups == []


# ----------------------------------------------------------------------------------------------------------------------
# collate and resolution sampling
# ----------------------------------------------------------------------------------------------------------------------


def test_collate_packed():
    proc = Siglip2NavitImageProcessor(min_pixels=32 * 32, max_pixels=64 * 96)
    a = proc(images=_frames(1, 64, 64)[0], return_tensors="pt")  # 16 rows
    b = proc(images=_frames(1, 32, 96)[0], return_tensors="np")  # 12 rows
    c = dict(proc(images=_frames(1, 64, 96)[0], return_tensors="pt"))  # 24 rows
    c["keep_indices"] = torch.tensor([4, 5, 6, 7])
    batch = collate_packed([a, b, c])
    assert batch["pixel_values"].shape == (52, 768) and batch["pixel_values"].dtype == torch.float32
    assert batch["grid_thws"].tolist() == [[1, 4, 4], [1, 2, 6], [1, 4, 6]]
    assert batch["grid_thws"].dtype == torch.int64
    assert batch["keep_indices"].tolist() == list(range(16)) + list(range(16, 28)) + [32, 33, 34, 35]
    torch.testing.assert_close(batch["pixel_values"][28:52], c["pixel_values"])
    no_keep = collate_packed([a, b], return_tensors="np")
    assert "keep_indices" not in no_keep and isinstance(no_keep["pixel_values"], np.ndarray)

    with pytest.raises(ValueError, match="non-empty list"):
        collate_packed([])
    with pytest.raises(ValueError, match="strictly increasing"):
        collate_packed([{**dict(a), "keep_indices": torch.tensor([3, 2])}])
    with pytest.raises(ValueError, match="describes 16 patches"):
        collate_packed([{"pixel_values": a["pixel_values"][:10], "grid_thws": a["grid_thws"]}])
    with pytest.raises(ValueError, match="width"):
        collate_packed([a, {"pixel_values": torch.zeros(16, 10), "grid_thws": a["grid_thws"]}])
    bad_samples = {  # never silently cast: the model would refuse each of these
        "float keep_indices": ({**dict(a), "keep_indices": torch.tensor([0.9, 1.5])}, "1-D integer"),
        "bool keep_indices": ({**dict(a), "keep_indices": torch.tensor([False, True])}, "1-D integer"),
        "2-D keep_indices": ({**dict(a), "keep_indices": torch.tensor([[0, 1], [2, 3]])}, "1-D integer"),
        "float grid": ({**dict(a), "grid_thws": a["grid_thws"].float() + 0.7}, "positive integers"),
        "zero grid": ({"pixel_values": a["pixel_values"][:0], "grid_thws": torch.tensor([[1, 0, 4]])}, "positive"),
        "integer pixels": ({**dict(a), "pixel_values": a["pixel_values"].long()}, "floating point"),
    }
    for name, (sample, match) in bad_samples.items():
        with pytest.raises(ValueError, match=match):
            collate_packed([sample])


def test_sample_max_pixels():
    first = sample_max_pixels(123, 256 * 256, 1024 * 1024, num_samples=2000)
    assert first == sample_max_pixels(np.int64(123), 256 * 256, 1024 * 1024, num_samples=2000)  # seeded
    assert first != sample_max_pixels(124, 256 * 256, 1024 * 1024, num_samples=2000)
    assert all(256 * 256 <= b <= 1024 * 1024 and b % 1024 == 0 for b in first)
    # Below the geometric mean 512²: log-uniform area -> P = 1/2 (1000 ± 22 of 2000); uniform side in [256, 1024]
    # -> P = (512 - 256) / (1024 - 256) = 1/3 (667 ± 21). The windows (> 4 sd apart) tell the two apart.
    assert 900 < sum(b < 512 * 512 for b in first) < 1100
    sides = sample_max_pixels(123, 256 * 256, 1024 * 1024, num_samples=2000, distribution="uniform_side")
    assert 580 < sum(b < 512 * 512 for b in sides) < 750
    with pytest.raises(ValueError, match="No whole 32x32 tile"):
        sample_max_pixels(0, 1100, 2000)  # 1024 < 1100 and 2048 > 2000
    single = sample_max_pixels(np.random.default_rng(0), 1024, 4096, distribution="uniform_side")
    assert isinstance(single, int) and 1024 <= single <= 4096
    import random

    assert isinstance(sample_max_pixels(random.Random(1), 1024, 4096), int)
    proc = Siglip2NavitImageProcessor()
    out = proc(images=GOOD, min_pixels=1024, max_pixels=sample_max_pixels(0, 1024, 8192))
    assert out["grid_thws"].shape == (1, 3)
    with pytest.raises(ValueError, match="low.*must not be larger"):
        sample_max_pixels(0, 5000, 4000)
    with pytest.raises(ValueError, match="distribution"):
        sample_max_pixels(0, 1024, 4096, distribution="normal")
    with pytest.raises(ValueError, match="at least one 32x32 tile"):
        sample_max_pixels(0, 10, 100)
