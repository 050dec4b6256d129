# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Tiny source checkpoints of every family and the converter entry point, shared by the family-folder tests."""

from pathlib import Path
from typing import Dict, Tuple

import transformers

from test_dinov3 import BASE as DINOV3_BASE
from test_dinov3 import randomize_ as randomize_all  # every parameter away from its init
from test_dinov3 import write_source as write_dinov3_source

from siglip2_navit.tools import convert_aimv2, convert_dinov3, convert_ovis, convert_siglip2_naflex, push


CONVERTERS = {
    "ovis": convert_ovis.convert,
    "siglip2-naflex": convert_siglip2_naflex.convert,
    "aimv2": convert_aimv2.convert,
    "dinov3": convert_dinov3.convert,
}


def convert_folder(family: str, src: Path, dst: Path, **options) -> Path:
    """`navit-convert FAMILY SRC DST` as a function."""
    return Path(CONVERTERS[family](src, dst, **options))


def push_validate(folder: Path) -> None:
    """What `navit-push --dry-run` checks before it would upload."""
    push.validate(folder)


def write_family_sources(base: Path, naflex_source: Path) -> Dict[str, Tuple[str, Path, dict]]:
    """`{kind: (family, source folder, converter options)}` for every kind of converted folder."""
    from test_convert import write_fake_ovis

    base = Path(base)
    ovis = base / "ovis-source"
    write_fake_ovis(ovis)
    sources = {
        "ovis": ("ovis", ovis, {}),
        "naflex": ("siglip2-naflex", naflex_source, {}),
        "naflex-stride2": ("siglip2-naflex", naflex_source, {"hidden_stride": 2}),
        "dinov3": ("dinov3", write_dinov3_source(base / "dinov3-source", **{**DINOV3_BASE, "patch_size": 16}), {}),
    }
    aimv2 = getattr(transformers, "Aimv2VisionModel", None)
    if aimv2 is not None:
        for name, native in (("aimv2-native", True), ("aimv2-224", False)):
            config = transformers.Aimv2VisionConfig(
                hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                image_size=56, is_native=native,
            )
            randomize_all(aimv2(config)).save_pretrained(base / f"{name}-source")
            sources[name] = ("aimv2", base / f"{name}-source", {})
    return sources

