# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""`navit-visualize` / `tools.visualize`: pictures at the resolution the model saw, deterministic, for every family,
odd grids, hidden_stride 1 and 2 and video frames; the attention weights reproduce the model's own pooled output."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from siglip2_navit import image_processing_siglip2_navit as processing
from siglip2_navit.configuration_aimv2_navit import Aimv2NavitConfig
from siglip2_navit.configuration_dinov3_navit import Dinov3NavitConfig
from siglip2_navit.configuration_siglip2_navit import Siglip2NavitConfig
from siglip2_navit.modeling_aimv2_navit import Aimv2NavitModel
from siglip2_navit.modeling_dinov3_navit import Dinov3NavitModel
from siglip2_navit.modeling_siglip2_navit import Siglip2NavitModel
from siglip2_navit.tools import visualize as viz
from test_dinov3 import randomize_  # every parameter away from its init


ROOT = Path(__file__).resolve().parent.parent
CHELSEA, ROCKET = ROOT / "examples" / "chelsea.png", ROOT / "examples" / "rocket.jpg"  # 451x300, 640x427
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    return randomize_(model).eval()


def family_model(family: str, stride: int) -> torch.nn.Module:
    if family == "siglip2":  # naflex-like: MAP head, no RoPE
        config = Siglip2NavitConfig(**TINY, patch_size=8, hidden_stride=stride, vision_use_head=True, use_rope=False)
        return randomized(Siglip2NavitModel(config))
    if family == "ovis":  # no head: no attention picture
        return randomized(Siglip2NavitModel(Siglip2NavitConfig(**TINY, patch_size=8, hidden_stride=stride)))
    if family == "aimv2":
        config = Aimv2NavitConfig(**TINY, patch_size=8, is_native=True, hidden_stride=stride)
        return randomized(Aimv2NavitModel(config))
    config = Dinov3NavitConfig(**TINY, patch_size=8, num_register_tokens=2, hidden_stride=stride)
    model = randomized(Dinov3NavitModel(config))
    model.set_attn_implementation("eager")
    return model


def processor_for(model: torch.nn.Module, **settings) -> processing.Siglip2NavitImageProcessor:
    config = model.config
    return processing.Siglip2NavitImageProcessor(
        patch_size=config.patch_size, hidden_stride=config.hidden_stride, min_pixels=64 * 64, max_pixels=120 * 120,
        image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25], **settings,
    )


def test_raster_index_inverts_the_processor_block_order():
    """The processor's stride-2 rows put back in raster order equal its stride-1 rows (same image, same size)."""
    image = PIL.Image.open(CHELSEA)
    block = processing.Siglip2NavitImageProcessor(patch_size=8, hidden_stride=2, min_pixels=64 * 64, max_pixels=96 * 96)
    rows = block(image, return_tensors="pt")
    _, h, w = rows["grid_thws"][0].tolist()
    resized = np.asarray(image.convert("RGB").resize((w * 8, h * 8), resample=PIL.Image.Resampling.BILINEAR))
    plain = processing.Siglip2NavitImageProcessor(patch_size=8, hidden_stride=1, do_resize=False)(resized, return_tensors="pt")
    torch.testing.assert_close(rows["pixel_values"][viz.raster_index(h, w, 2)], plain["pixel_values"])


@pytest.mark.parametrize("stride", [1, 2])
def test_seen_images_are_the_resized_input(stride):
    """Un-normalised and put in raster order, the processor's rows are PIL's resize of the input (what the model
    saw), whatever the normalisation and the token order."""
    image = PIL.Image.open(CHELSEA).convert("RGB")
    processor = processing.Siglip2NavitImageProcessor(
        patch_size=8, hidden_stride=stride, min_pixels=64 * 64, max_pixels=120 * 120, image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.3, 0.25], resample=3,
    )
    inputs = processor(image, return_tensors="pt")
    grid = inputs["grid_thws"][0].tolist()
    expected = np.asarray(image.resize((grid[2] * 8, grid[1] * 8), resample=PIL.Image.Resampling.BICUBIC))
    seen = viz.seen_images(inputs["pixel_values"], grid, stride, processor)
    assert seen.shape == (1, *expected.shape)
    assert np.abs(seen[0].astype(int) - expected.astype(int)).max() == 0


def test_principal_colours_follow_the_main_direction_of_variation():
    """Tokens varying mostly along one direction with position: the first channel is monotone in that position."""
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=generator)
    position = torch.linspace(-1, 1, 50)
    tokens = position[:, None] * direction * 10 + torch.randn(50, 16, generator=generator) * 0.1
    colours = viz.principal_colours(tokens)
    assert colours.shape == (50, 3) and colours.min() >= 0 and colours.max() <= 1
    first = colours[:, 0]
    assert torch.all(first[1:] >= first[:-1]) or torch.all(first[1:] <= first[:-1])
    assert torch.equal(viz.principal_colours(tokens), colours)  # deterministic
    torch.testing.assert_close(viz.principal_colours(-tokens), colours)  # signs fixed by the largest projection
    assert torch.all(viz.principal_colours(torch.ones(4, 8)) == 0.5)  # constant features: mid grey


@pytest.mark.parametrize("family", ["siglip2", "aimv2", "dinov3", "ovis"])
@pytest.mark.parametrize("stride", [1, 2])
def test_pictures_sizes_and_determinism(family, stride, tmp_path):
    model = family_model(family, stride)
    processor = processor_for(model, resize_rule="naflex", max_num_patches=91 * stride * stride)  # odd grids at 1
    first = viz.visualize(model, processor, images=[CHELSEA, ROCKET])
    second = viz.visualize(model, processor, images=[CHELSEA, ROCKET])
    for pictures, again in zip(first, second):
        t, h, w = pictures.grid
        assert pictures.features.size == (w * 8 * t, h * 8)
        assert np.array_equal(np.asarray(pictures.features), np.asarray(again.features))
        if family == "ovis":
            assert pictures.attention is None
        else:
            assert pictures.attention.size == pictures.features.size
            assert np.array_equal(np.asarray(pictures.attention), np.asarray(again.attention))
    if stride == 1:
        assert any(h % 2 or w % 2 for _, h, w in (p.grid for p in first)), "expected an odd grid"
    paths = viz.save_pictures(first[0], tmp_path, "chelsea")
    assert [p.name for p in paths] == ["chelsea.features.png"] + ([] if family == "ovis" else ["chelsea.attention.png"])
    assert PIL.Image.open(paths[0]).size == first[0].features.size


@pytest.mark.parametrize("family", ["siglip2", "dinov3"])
def test_video_frames_side_by_side(family):
    model = family_model(family, 2)
    processor = processor_for(model)
    frames = [PIL.Image.open(CHELSEA), PIL.Image.open(CHELSEA).transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)]
    (video,) = viz.visualize(model, processor, videos=[frames])
    t, h, w = video.grid
    assert t == 2 and video.features.size == (2 * w * 8, h * 8)
    pixels = np.asarray(video.features)
    assert not np.array_equal(pixels[:, : w * 8], pixels[:, w * 8 :])  # each frame its own features, one colouring
    assert video.attention.size == video.features.size


def test_pooling_query_weights_reproduce_the_pooled_output():
    """Per head, the weights of `pooling_query_weights` applied to the head's values give the model's own
    `pooler_output` (SigLIP MAP head and AIMv2 attention pooling)."""
    image = PIL.Image.open(ROCKET)
    for family in ("siglip2", "aimv2"):
        model = family_model(family, 1)
        inputs = processor_for(model)(image, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
            tokens = out.last_hidden_state  # [L, D]
            weights = viz.pooling_query_weights(model, tokens)  # [heads, L]
            assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[0]))
            heads, dim = weights.shape[0], tokens.shape[1]
            if family == "siglip2":
                head = model.vision_model.head
                w_v = head.attention.in_proj_weight[2 * dim :]
                b_v = head.attention.in_proj_bias[2 * dim :]
                values = (tokens @ w_v.T + b_v).view(-1, heads, dim // heads).transpose(0, 1)  # [heads, L, d]
                attended = (weights[:, None] @ values).reshape(1, dim)
                probe_out = head.attention.out_proj(attended)
                pooled = probe_out + head.mlp(head.layernorm(probe_out))
            else:
                head = model.head
                values = head.v_proj(tokens).view(-1, heads, dim // heads).transpose(0, 1)
                pooled = head.output_proj((weights[:, None] @ values).reshape(1, dim))
            torch.testing.assert_close(pooled, out.pooler_output, atol=1e-5, rtol=1e-5)


def test_dinov3_attention_is_the_cls_row_of_the_last_layer():
    model = family_model("dinov3", 1)
    processor = processor_for(model)
    inputs = processor(PIL.Image.open(CHELSEA), return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    (weights,) = viz.attention_maps(model, out, inputs["grid_thws"].tolist())
    cls_row = out.attentions[-1][0][:, 0]  # [heads, 1 + registers + patches]
    prefix = 1 + model.config.num_register_tokens
    torch.testing.assert_close(weights[0], cls_row[:, prefix:].mean(0))
    assert 0 < float(weights.sum()) < 1  # the CLS token also attends to itself and the registers


def test_cli_refuses_missing_files_before_loading(tmp_path, capsys):
    args = [str(CHELSEA), str(tmp_path / "nope.png"), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")]
    assert viz.main(args) == 1
    assert "no such image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_on_a_converted_folder_matches_the_folder_picture(tmp_path, capsys):
    """`navit-visualize` loads a folder through the Auto API; its picture of chelsea.png is the one the converter put
    in the folder (same model, same processor, deterministic), and `--video` lays the frames side by side."""
    from siglip2_navit.tools import checkpoint_utils as utils

    config = Siglip2NavitConfig(**TINY, patch_size=16, hidden_stride=2, vision_use_head=True)
    state = randomized(Siglip2NavitModel(config)).state_dict()
    folder = utils.atomic_write_folder(tmp_path / "tiny", lambda tmp: utils.save_model_folder(tmp, state, config))
    out = tmp_path / "out"
    assert viz.main([str(CHELSEA), str(ROCKET), "--model", str(folder), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "chelsea.attention.png", "chelsea.features.png", "rocket.attention.png", "rocket.features.png"]
    for kind in ("features", "attention"):
        ours = np.asarray(PIL.Image.open(out / f"chelsea.{kind}.png"))
        assert np.array_equal(ours, np.asarray(PIL.Image.open(folder / "pictures" / f"chelsea.{kind}.png")))
    assert viz.main([str(CHELSEA), str(CHELSEA), "--video", "--model", str(folder), "--out", str(out)]) == 0
    video = PIL.Image.open(out / "chelsea.video.features.png")
    width, height = PIL.Image.open(out / "chelsea.features.png").size
    assert video.size == (2 * width, height)


@pytest.mark.parametrize("family", ["siglip2", "aimv2", "dinov3"])
def test_stride_2_pictures_are_the_stride_1_pictures(family):
    """One model, one image, one grid: with hidden_stride 2 the tokens come in 2x2-block order, yet put back in
    place they are the same tokens (attention does not depend on the order), so the features and attention
    pictures equal those of the raster-order (stride 1) model, for an image and a 2-frame video."""
    model_1, model_2 = family_model(family, 1), family_model(family, 2)
    model_2.load_state_dict(model_1.state_dict())
    image = np.asarray(PIL.Image.open(ROCKET).convert("RGB").resize((80, 48)))  # a 6x10 patch grid
    pictures = {}
    for stride, model in ((1, model_1), (2, model_2)):
        processor = processor_for(model, do_resize=False)
        pictures[stride] = viz.visualize(model, processor, images=[image], videos=[[image, image[:, ::-1]]])
    for one, two in zip(pictures[1], pictures[2]):
        assert one.grid == two.grid
        for kind in ("features", "attention"):
            a, b = np.asarray(getattr(one, kind), dtype=int), np.asarray(getattr(two, kind), dtype=int)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1, (kind, np.abs(a - b).max())
