"""Models: timm's ResNet family with X-volution swapped in (importing registers the x-entries
with timm), X-volution in any other CNN (convert), the validated description every tool builds
from (ModelSpec), and a detection backbone (fpn_backbone)."""

from xvol.models import registry  # noqa: F401  (xresnet18..152 in timm; its resnets take stem=)
from xvol.models.convert import ConvertPlan, convert, plan_convert
from xvol.models.detection import fpn_backbone
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
    "ConvertPlan",
    "STEMS",
    "SUPPORTED_ARCHS",
    "ModelSpec",
    "ModelSpecError",
    "build_model",
    "check_stages",
    "convert",
    "count_ops",
    "count_params",
    "fpn_backbone",
    "model_summary",
    "plan_convert",
    "use_stem",
    "xconv_slots",
]
