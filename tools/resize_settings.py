# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The resize rule a converted folder's processor gets, from its source's `preprocessor_config.json`, so that the
folder preprocesses as its source does:

* SigLIP2 naflex -> `resize_rule="naflex"` with the source's `max_num_patches` (256, naflex's default, when absent);
* AIMv2 checkpoints with a learned position table for one grid (`is_native: false`) -> `resize_rule="center_crop"`
  with the source's CLIP-style `size.shortest_edge` and `crop_size` (both `image_size` when absent); the crop must be
  the table's grid, or the folder could not encode anything;
* everything else (Ovis2.5, native AIMv2, DINOv3) keeps native resolution (`resize_rule="ovis"`, the default).

Every function raises `ValueError` with the reason when the source's settings cannot be followed.
"""

from typing import Any, Dict, Mapping, Optional, Tuple


NAFLEX_DEFAULT_MAX_NUM_PATCHES = 256  # transformers' Siglip2ImageProcessor default


def _side(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` in the source's preprocessor_config.json must be a positive integer, got {value!r}.")
    return value


def naflex_settings(source: Optional[Mapping[str, Any]], patch_size: int) -> Dict[str, Any]:
    """Processor settings of a naflex conversion: the naflex rule with the source's patch budget."""
    source = source or {}
    if source.get("patch_size") is not None and source["patch_size"] != patch_size:
        raise ValueError(
            f"The source processor cuts {source['patch_size']}-px patches but the model's patch_size is {patch_size}."
        )
    budget = source.get("max_num_patches")
    budget = NAFLEX_DEFAULT_MAX_NUM_PATCHES if budget is None else _side(budget, "max_num_patches")
    return {"resize_rule": "naflex", "max_num_patches": budget}


def _crop_of(source: Mapping[str, Any], image_size: int) -> Tuple[int, int]:
    crop = source.get("crop_size")
    if crop is None:
        return image_size, image_size
    if isinstance(crop, dict):
        return _side(crop.get("height"), "crop_size.height"), _side(crop.get("width"), "crop_size.width")
    return _side(crop, "crop_size"), _side(crop, "crop_size")


def fixed_size_settings(source: Optional[Mapping[str, Any]], image_size: int, patch_size: int) -> Dict[str, Any]:
    """Processor settings for a checkpoint whose position table covers one `image_size` grid: CLIP's shortest-edge
    resize and centre crop to exactly that grid."""
    source = source or {}
    size = source.get("size")
    if source.get("do_center_crop") is False or (isinstance(size, dict) and "shortest_edge" not in size and size):
        raise ValueError(
            f"The source processor resizes without CLIP's shortest-edge + centre crop (size={size!r}, "
            f"do_center_crop={source.get('do_center_crop')!r}); only that fixed-size preprocessing is reproduced."
        )
    shortest = size.get("shortest_edge") if isinstance(size, dict) else size
    shortest = image_size if shortest is None else _side(shortest, "size.shortest_edge")
    crop = _crop_of(source, image_size)
    if crop != (image_size, image_size):
        raise ValueError(
            f"The source processor's crop_size {crop[0]}x{crop[1]} is not the {image_size}x{image_size} image whose "
            f"{image_size // patch_size}x{image_size // patch_size} patch grid the checkpoint's position table covers."
        )
    return {"resize_rule": "center_crop", "shortest_edge": shortest, "crop_size": [image_size, image_size]}
