"""Models: timm ResNets with X-volution swapped in; importing registers xresnet* with timm."""

from xvol.models import registry  # noqa: F401  (xresnet18..152 in timm; its resnets take stem=)
from xvol.models.resnet import (
    STEMS,
    SUPPORTED_ARCHS,
    build_model,
    check_stages,
    use_stem,
    xconv_slots,
)
from xvol.models.spec import ModelSpec, ModelSpecError
from xvol.models.summary import count_ops, count_params, model_summary

__all__ = [
    "STEMS",
    "SUPPORTED_ARCHS",
    "ModelSpec",
    "ModelSpecError",
    "build_model",
    "check_stages",
    "count_ops",
    "count_params",
    "model_summary",
    "use_stem",
    "xconv_slots",
]
