# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The family registry: every encoder family on the packed core, its modules and classes, and what a converted
folder ships (remote-code files, `auto_map`, custom pipeline).
"""


import importlib
import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch


# The installed package (or the checkout, installed editable): its remote-code modules are what a converted folder ships.
PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGE = "siglip2_navit"
MODEL_CARD = "README.md"
# The folder the model card's code opens (examples/): copied into every converted folder, so that the card's snippets
# run in the Hub repository too (package data of an installed package).
CARD_ASSETS = ("examples",)
CORE_FILES = (
    "navit_layout.py", "navit_attention.py", "navit_core.py",
    "navit_image_utils.py", "navit_batching.py", "image_processing_siglip2_navit.py",
    "pipeline_navit.py",
)  # every family ships them


@dataclass(frozen=True)
class Family:
    """One encoder family on the shared packed core: its modules and classes, and what a converted folder ships."""

    name: str
    model_type: str
    configuration: str  # module (file stem) of the config class
    config_class_name: str
    modeling: str
    model_class_name: str
    processor_defaults: Mapping[str, Any] = field(default_factory=dict)  # processor settings when the source has none

    @property
    def code_files(self) -> Tuple[str, ...]:
        """The remote code of a converted folder: the family's two modules and the shared ones."""
        return (f"{self.configuration}.py", f"{self.modeling}.py", *CORE_FILES)

    @property
    def auto_map(self) -> Dict[str, str]:
        return {
            "AutoConfig": f"{self.configuration}.{self.config_class_name}",
            "AutoModel": f"{self.modeling}.{self.model_class_name}",
        }


SIGLIP2 = Family(
    "siglip2", "siglip2_navit", "configuration_siglip2_navit", "Siglip2NavitConfig", "modeling_siglip2_navit",
    "Siglip2NavitModel",
)
AIMV2 = Family(
    "aimv2", "aimv2_navit", "configuration_aimv2_navit", "Aimv2NavitConfig", "modeling_aimv2_navit", "Aimv2NavitModel",
    processor_defaults={  # CLIP normalisation, bicubic (transformers' Aimv2 / CLIP image processor defaults)
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
    },
)
DINOV3 = Family(
    "dinov3", "dinov3_navit", "configuration_dinov3_navit", "Dinov3NavitConfig", "modeling_dinov3_navit",
    "Dinov3NavitModel",
    processor_defaults={  # ImageNet normalisation, bilinear (transformers' DINOv3 image processor defaults)
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "resample": 2,
    },
)
FAMILIES: Dict[str, Family] = {family.model_type: family for family in (SIGLIP2, AIMV2, DINOV3)}
# Every remote-code file a converted folder may ship: `push_to_hub.py` refuses any other `.py` file in a folder and
# any of these that is not byte-identical to this checkout's copy.
CODE_FILES = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.code_files))
# config.json's `custom_pipelines`: `pipeline("image-feature-extraction", model=DST, trust_remote_code=True)` builds
# pipeline_navit's packed pipeline (transformers' own splits packed outputs row by row when batching).
CUSTOM_PIPELINES = {
    "image-feature-extraction": {
        "impl": "pipeline_navit.NavitImageFeatureExtractionPipeline",
        "pt": ["AutoModel"],
        "tf": [],
        "type": "image",
    }
}
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted as asked (missing tensors, shape mismatch, existing destination, ...)."""


# ----------------------------------------------------------------------------------------------------------------------
# the package these tools belong to (`siglip2_navit`)
# ----------------------------------------------------------------------------------------------------------------------


def import_package():
    """Return the `siglip2_navit` package (installed, or a checkout registered under that name by a scripts/ shim)."""
    return importlib.import_module(PACKAGE)


def family_of(config) -> Family:
    """The family of `config` (a config object or its `model_type` string)."""
    model_type = config if isinstance(config, str) or config is None else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConversionError(f"No model family for model_type {model_type!r}: expected one of {sorted(FAMILIES)}.")
    return FAMILIES[model_type]


def processor_class():
    """The image processor every family's folder ships."""
    import_package()
    return importlib.import_module(f"{PACKAGE}.image_processing_siglip2_navit").Siglip2NavitImageProcessor


def config_class(family: Family = SIGLIP2):
    import_package()
    return getattr(importlib.import_module(f"{PACKAGE}.{family.configuration}"), family.config_class_name)


def model_class(family: Family = SIGLIP2):
    import_package()
    return getattr(importlib.import_module(f"{PACKAGE}.{family.modeling}"), family.model_class_name)


def config_fields(family: Family = SIGLIP2) -> set:
    """The architecture fields the family's config `__init__` takes."""
    params = inspect.signature(config_class(family).__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def expected_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the family model's state dict for `config` and its shape, built on the meta device."""
    model_cls = model_class(family_of(config))
    with torch.device("meta"):
        model = model_cls(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
