"""Models: timm ResNets with X-volution swapped in; importing registers xresnet* with timm."""

from xvol.models import registry  # noqa: F401  (registers xresnet18/34/50/101/152 with timm)
from xvol.models.resnet import SUPPORTED_ARCHS, build_model, check_stages, xconv_slots
from xvol.models.spec import ModelSpec, ModelSpecError
from xvol.models.summary import count_ops, count_params, model_summary

__all__ = [
    "SUPPORTED_ARCHS",
    "ModelSpec",
    "ModelSpecError",
    "build_model",
    "check_stages",
    "count_ops",
    "count_params",
    "model_summary",
    "xconv_slots",
]
