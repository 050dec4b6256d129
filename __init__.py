"""siglip2-navit: the repo root is both a Hugging Face model folder and the installable package `siglip2_navit`."""

from .configuration_siglip2_navit import Siglip2NavitConfig
from .modeling_siglip2_navit import Siglip2NavitModel, Siglip2NavitPreTrainedModel


__all__ = ["Siglip2NavitConfig", "Siglip2NavitModel", "Siglip2NavitPreTrainedModel"]
