"""Config and input checks every family shares (navit_layout): hostile values are one ValueError naming the setting,
raised at config load or before any compute; never a raw traceback, a hang or silent NaN features."""

import json

import pytest
import torch

from siglip2_navit import Aimv2NavitConfig, Dinov3NavitConfig, Siglip2NavitConfig
from siglip2_navit.image_processing_siglip2_navit import MAX_PIXEL_BUDGET, Siglip2NavitImageProcessor


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=2)
FAMILIES = {
    "siglip2": (Siglip2NavitConfig, dict(TINY, image_size=16, hidden_stride=1), "layer_norm_eps", "vision_use_head"),
    "aimv2": (Aimv2NavitConfig, dict(TINY, image_size=16, is_native=True), "rms_norm_eps", "use_head"),
    "dinov3": (Dinov3NavitConfig, dict(TINY, image_size=16), "layer_norm_eps", "use_gated_mlp"),
}


def _cases(family: str):
    _, _, eps, flag = FAMILIES[family]
    cases = [
        ({eps: "x"}, eps), ({eps: -1e-6}, eps), ({eps: 0.0}, eps), ({eps: float("nan")}, eps),
        ({flag: "no"}, flag), ({flag: 1}, flag),
        ({"num_hidden_layers": 10**5}, "num_hidden_layers"), ({"num_hidden_layers": 1e6}, "num_hidden_layers"),
        ({"hidden_size": 10**9, "num_attention_heads": 4}, "hidden_size"),
        ({"intermediate_size": 10**9}, "intermediate_size"),
        ({"hidden_act": "no_such_activation"}, "hidden_act"), ({"hidden_act": 3}, "hidden_act"),
        ({"attention_dropout": 1.5}, "attention_dropout"), ({"attention_dropout": "0.1"}, "attention_dropout"),
        ({"auto_map": "configuration_x.Config"}, "auto_map"),
        ({"dtype": "evil"}, "dtype"), ({"torch_dtype": "evil"}, "torch_dtype"),
        ({"dtype": "float8_e4m3fn"}, "dtype"), ({"dtype": torch.float8_e5m2}, "dtype"),
    ]
    if family != "aimv2":
        cases += [({"rope_theta": -1.0}, "rope_theta"), ({"rope_theta": 0}, "rope_theta"),
                  ({"rope_theta": "1e4"}, "rope_theta")]
    return cases


CASES = [(family, overrides, name) for family in FAMILIES for overrides, name in _cases(family)]


@pytest.mark.parametrize("family,overrides,name", CASES, ids=[f"{f}-{next(iter(o))}={o[next(iter(o))]!r}" for f, o, _ in CASES])
def test_hostile_config_values_are_one_value_error_naming_the_setting(family, overrides, name):
    config_class, tiny, _, _ = FAMILIES[family]
    with pytest.raises(ValueError, match=f"`{name}`"):
        config_class(**{**tiny, **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_checks_apply_to_a_saved_config_json(family, tmp_path):
    """A config.json edited by hand is checked when it is loaded, not when the model later makes NaN."""
    config_class, tiny, eps, _ = FAMILIES[family]
    config_class(**tiny).save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    values[eps] = -1.0
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=f"`{eps}`"):
        config_class.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_accepted_values_still_load(family):
    """The bounds refuse only the absurd: real sizes (so400m, ViT-7B widths) and usual dtypes pass."""
    config_class, tiny, _, _ = FAMILIES[family]
    for overrides in (dict(hidden_size=4096, num_attention_heads=32, intermediate_size=16384, num_hidden_layers=40),
                      dict(dtype="bfloat16"), dict(torch_dtype=torch.float16)):
        config_class(**{**tiny, **overrides})


def _tiny_model(family: str, dtype: torch.dtype = torch.float32):
    from siglip2_navit import Aimv2NavitModel, Dinov3NavitModel, Siglip2NavitModel

    model_class = {"siglip2": Siglip2NavitModel, "aimv2": Aimv2NavitModel, "dinov3": Dinov3NavitModel}[family]
    config_class, tiny, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    return model_class(config_class(**tiny)).eval().to(dtype)


def _inputs(dtype: torch.dtype = torch.float32):
    grids = torch.tensor([[1, 4, 6], [1, 2, 2]])
    return torch.randn(28, 3 * 2 * 2, dtype=dtype), grids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,value", [(torch.float32, 1e30), (torch.float16, 1e5), (torch.float32, float("inf"))])
def test_huge_pixel_values_are_refused_before_compute(family, dtype, value):
    model = _tiny_model(family, dtype)
    pixel_values, grids = _inputs(dtype)
    pixel_values[5, 3] = value
    with pytest.raises(ValueError, match="pixel_values"):
        model(pixel_values, grids)
    pixel_values[5, 3] = 3.0  # a normalised pixel: fine, and finite features
    assert torch.isfinite(model(pixel_values, grids).last_hidden_state).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_device_inputs_are_refused(family):
    model = _tiny_model(family)
    pixel_values, grids = _inputs()
    with pytest.raises(ValueError, match="meta device"):
        model(pixel_values.to("meta"), grids)


@pytest.mark.parametrize("setting", ["min_pixels", "max_pixels"])
def test_processor_pixel_budget_has_a_ceiling(setting, tmp_path):
    budget = {"min_pixels": 448 * 448, "max_pixels": 1792 * 1792, setting: 1e11}
    if setting == "min_pixels":
        budget["max_pixels"] = 1e11
    with pytest.raises(ValueError, match=f"`{setting}` = 100000000000 exceeds .* {MAX_PIXEL_BUDGET}"):
        Siglip2NavitImageProcessor(**budget)
    processor = Siglip2NavitImageProcessor()
    processor.save_pretrained(tmp_path)
    for name in ("preprocessor_config.json", "processor_config.json"):  # whichever this transformers reads
        values = json.loads((tmp_path / name).read_text())
        settings = values.get("image_processor", values)
        settings.update(min_pixels=int(1e11), max_pixels=int(1e11))
        (tmp_path / name).write_text(json.dumps(values))
    with pytest.raises(ValueError, match="exceeds the largest supported budget"):
        Siglip2NavitImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="exceeds the largest supported budget"):
        processor(images=[torch.zeros(3, 32, 32)], max_pixels=10**12, return_tensors="pt")
