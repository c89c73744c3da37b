"""Models: a registry over our TinyCNN family and timm, and local pretrained weights."""

from lensforge.models.registry import (
    MODELS,
    count_params,
    create_model,
    default_preprocess,
    list_models,
)

__all__ = ["MODELS", "count_params", "create_model", "default_preprocess", "list_models"]
