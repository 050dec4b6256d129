"""siglip2-navit: the repo root is both a Hugging Face model folder and the installable package `siglip2_navit`."""

# Only as the package `siglip2_navit` (installed, editable or not): tools that import this folder by its directory
# name (pytest collecting the checkout, whatever the clone is called) must not fail on the relative imports.
if __package__:
    from .configuration_aimv2_navit import Aimv2NavitConfig
    from .configuration_dinov3_navit import Dinov3NavitConfig
    from .configuration_siglip2_navit import Siglip2NavitConfig
    from .image_processing_siglip2_navit import Siglip2NavitImageProcessor
    from .modeling_aimv2_navit import Aimv2NavitModel, Aimv2NavitPreTrainedModel
    from .modeling_dinov3_navit import Dinov3NavitModel, Dinov3NavitPreTrainedModel
    from .modeling_siglip2_navit import Siglip2NavitModel, Siglip2NavitPreTrainedModel

    __all__ = [
        "Siglip2NavitConfig",
        "Siglip2NavitImageProcessor",
        "Siglip2NavitModel",
        "Siglip2NavitPreTrainedModel",
        "Aimv2NavitConfig",
        "Aimv2NavitModel",
        "Aimv2NavitPreTrainedModel",
        "Dinov3NavitConfig",
        "Dinov3NavitModel",
        "Dinov3NavitPreTrainedModel",
    ]
