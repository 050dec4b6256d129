# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""The `image-feature-extraction` pipeline for packed (NaViT) vision encoders, shipped as remote code.

transformers' own `ImageFeatureExtractionPipeline` assumes outputs with a batch dimension: with `batch_size > 1` it
cuts the packed `last_hidden_state` `[Σ tokens, hidden]` row by row, so each image gets one token row of some image
(or an `IndexError`). This pipeline packs every batch of images into one call `model(pixel_values, grid_thws)` (each
image attends only to itself, so the result equals calling the model on each image alone) and splits the outputs
back per image by its `grid_thws` row (`t·h·w` tokens).

Results, per image, as transformers' pipeline gives them for standard models:

* default: the image's `last_hidden_state`, `[1, tokens, hidden]` (nested lists, or a tensor with
  `return_tensors=True`);
* `pool=True`: `[1, hidden]`, the model's `pooler_output` when it has one (e.g. SigLIP's MAP head), otherwise the
  mean of the image's tokens.

It is family-neutral: it needs only an image processor that returns `pixel_values` + `grid_thws` and a model whose
forward takes them and returns `last_hidden_state` (and `pooler_output`, possibly `None`). A model folder registers
it in `config.json`:

    "custom_pipelines": {"image-feature-extraction": {"impl": "pipeline_navit.NavitImageFeatureExtractionPipeline",
                                                      "pt": ["AutoModel"], "tf": [], "type": "image"}}

and `pipeline("image-feature-extraction", model=folder, trust_remote_code=True)` then builds this class.
"""

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from transformers import AutoImageProcessor
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import load_image
from transformers.pipelines import ImageFeatureExtractionPipeline

from .navit_layout import split_per_image

if TYPE_CHECKING:  # never run: names the core's modules for transformers < 5, which copies a local folder's remote code
    from .navit_attention import PACKED_ATTENTION_FUNCTIONS  # noqa: F401  (only the files each module imports itself)
    from .navit_image_utils import block_order_position  # noqa: F401
    from .navit_layout import MAX_CONFIG_INTS  # noqa: F401


# Strings that transformers' `load_image` fetches or decodes; everything else goes to the image processor as is.
_REMOTE_IMAGE_PREFIXES = ("http://", "https://", "data:image/")
# `return_tensors` values that mean "give torch tensors": transformers' pipelines take any truthy value.
_TENSOR_FLAGS = (True, "pt")
# Image processor arguments the pipeline sets itself.
_RESERVED_PROCESSOR_KWARGS = ("images", "videos", "return_tensors")


def _check_flag(name: str, value: Any, allowed: Sequence[Any] = (True, False)) -> None:
    """Raise unless `value` is one of `allowed` (booleans by default)."""
    if not any(value is option or (isinstance(option, str) and value == option) for option in allowed):
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def split_packed_outputs(
    last_hidden_state: torch.Tensor, pooler_output: Optional[torch.Tensor], grid_thws: torch.Tensor
) -> Dict[str, Any]:
    """Per-image pieces of one packed forward, in the layout transformers' pipeline iterator unbatches.

    One image: tensors with a leading batch dimension of 1 (`[1, tokens, hidden]`), as for a standard model. Several
    images: a list of `[tokens, hidden]` tensors (images have different token counts), which the iterator hands out
    one by one as `[1, tokens, hidden]`. `pooler_output` is `[n_images, hidden]` or `None` either way.
    """
    per_image = list(split_per_image(last_hidden_state, grid_thws))
    features: Union[torch.Tensor, List[torch.Tensor]] = per_image[0][None] if len(per_image) == 1 else per_image
    return {"last_hidden_state": features, "pooler_output": pooler_output}


class NavitImageFeatureExtractionPipeline(ImageFeatureExtractionPipeline):
    """Image features from a packed (NaViT) encoder: for any `batch_size`, each image gets exactly its own features.

    Call it like transformers' `image-feature-extraction` pipeline: one image (PIL image, local path, URL, numpy array
    or tensor) or a list of them, with `batch_size=`, `pool=`, `return_tensors=`, `image_processor_kwargs=` (e.g.
    `{"max_pixels": 448 * 448}`) and `timeout=` (for URLs). Each image gives `[1, tokens, hidden]` (its
    `last_hidden_state`), or with `pool=True` `[1, hidden]`: the model's `pooler_output` when the model has a pooling
    head, otherwise the mean of the image's tokens. Images of one batch run as one packed forward.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.image_processor is None:  # transformers < 4.52 loads no processor for a remote-code config
            self.image_processor = self._load_own_image_processor()

    def _load_own_image_processor(self) -> BaseImageProcessor:
        """The image processor saved with the model, at the model's revision (transformers 4.51 loads none)."""
        source = getattr(self.model, "name_or_path", "") or getattr(self.model.config, "_name_or_path", "")
        if not source:
            raise ValueError(
                f"{type(self).__name__} needs an image processor: pass `image_processor=` (the model was not loaded "
                f"from a folder or Hub id to load one from)."
            )
        revision = getattr(self.model.config, "_commit_hash", None)
        return AutoImageProcessor.from_pretrained(source, revision=revision, trust_remote_code=True)

    def _sanitize_parameters(
        self,
        image_processor_kwargs: Optional[Dict[str, Any]] = None,
        return_tensors: Optional[Union[bool, str]] = None,
        pool: Optional[bool] = None,
        timeout: Optional[float] = None,
        **unexpected: Any,
    ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
        """Check the call's options before any image is read, and route them to preprocess / postprocess."""
        if unexpected:
            raise TypeError(
                f"{type(self).__name__} got unexpected option(s) {sorted(unexpected)}; it takes pool, return_tensors, "
                f"image_processor_kwargs (a dict, e.g. {{'max_pixels': 448 * 448}}), timeout, batch_size, num_workers."
            )
        preprocess_params: Dict[str, Any] = {}
        if image_processor_kwargs is not None:
            if not isinstance(image_processor_kwargs, dict):
                raise TypeError(
                    f"`image_processor_kwargs` must be a dict of image processor options, "
                    f"got {type(image_processor_kwargs).__name__}."
                )
            reserved = sorted(set(image_processor_kwargs) & set(_RESERVED_PROCESSOR_KWARGS))
            if reserved:
                raise ValueError(f"`image_processor_kwargs` must not set {reserved}: the pipeline sets them itself.")
            preprocess_params.update(image_processor_kwargs)
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        postprocess_params: Dict[str, Any] = {}
        if pool is not None:
            _check_flag("pool", pool)
            postprocess_params["pool"] = pool
        if return_tensors is not None:
            _check_flag("return_tensors", return_tensors, (*_TENSOR_FLAGS, False))
            postprocess_params["return_tensors"] = return_tensors in _TENSOR_FLAGS
        return preprocess_params, {}, postprocess_params

    def preprocess(self, image: Any, timeout: Optional[float] = None, **image_processor_kwargs: Any) -> Dict[str, Any]:
        """One image → `{"pixel_values": [tokens, C·T·p·p], "grid_thws": [1, 3]}` (the collator concatenates both)."""
        if isinstance(image, str) and image.startswith(_REMOTE_IMAGE_PREFIXES):
            image = load_image(image, timeout=timeout)
        inputs = self.image_processor(images=image, return_tensors="pt", **image_processor_kwargs)
        if inputs["grid_thws"].shape[0] != 1:
            raise ValueError(
                f"Each pipeline input must be one image; this one gave {inputs['grid_thws'].shape[0]} images (a 4-D "
                f"array is a batch: pass a list of images instead)."
            )
        return {"pixel_values": inputs["pixel_values"], "grid_thws": inputs["grid_thws"]}

    def _forward(self, model_inputs: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """One packed forward over the batch's images, split back per image (see `split_packed_outputs`)."""
        grid_thws = model_inputs["grid_thws"]
        outputs = self.model(pixel_values=model_inputs["pixel_values"], grid_thws=grid_thws, return_dict=True)
        pooler_output = getattr(outputs, "pooler_output", None)
        return split_packed_outputs(outputs.last_hidden_state, pooler_output, grid_thws)

    def postprocess(
        self, model_outputs: Dict[str, Any], pool: bool = False, return_tensors: bool = False
    ) -> Union[torch.Tensor, list]:
        """One image's `[1, tokens, hidden]` features, or with `pool` its `[1, hidden]` embedding."""
        features = model_outputs["last_hidden_state"]
        if pool:
            pooled = model_outputs.get("pooler_output")
            features = pooled if pooled is not None else features.float().mean(dim=1).to(features.dtype)
        return features if return_tensors else features.tolist()
