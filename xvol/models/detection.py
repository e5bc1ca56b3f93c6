"""A detection backbone with X-volution: torchvision's ``BackboneWithFPN`` over a timm CNN.

The paper's COCO experiments put X-volution in a ResNet-50 backbone under Faster R-CNN; this is
that backbone for torchvision's detection models::

    backbone = xvol.models.fpn_backbone("xresnet50")         # any timm model, an x-entry too
    detector = torchvision.models.detection.FasterRCNN(backbone, num_classes=91)

Stages 1-4 (the modules timm's ``feature_info`` names, ``layer1..layer4`` in a ResNet) feed an
FPN with ``out_channels`` channels, plus the max-pooled level torchvision's ResNet-FPN has.
Everything is trainable and the BNs are regular ones: X-volution's branch BNs learn with the
detector (torchvision freezes its pretrained ResNet's BNs; there are no pretrained weights
here). ``xvol.reparam.reparameterize_model(backbone)`` gives the deploy form, whose features
equal the training form's in eval mode. COCO training is left to torchvision's detection
references (``references/detection/train.py``) with this backbone passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
from torch import nn

__all__ = ["fpn_backbone"]


def fpn_backbone(
    model: nn.Module | str,
    stages: Sequence[int] = (1, 2, 3, 4),
    out_channels: int = 256,
    **create_kwargs: Any,
) -> nn.Module:
    """torchvision ``BackboneWithFPN`` over ``model`` (a timm model or a timm model name).

    ``stages`` picks the feature levels (1: stride 4, ..., 4: stride 32) by timm's
    ``feature_info``; a name is created with ``pretrained=False`` and ``create_kwargs``.
    """
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    if isinstance(model, str):
        model = timm.create_model(model, pretrained=False, **create_kwargs)
    info = [i for i in getattr(model, "feature_info", None) or [] if isinstance(i, dict)]
    by_stage = {i["reduction"].bit_length() - 2: i for i in info if i.get("reduction", 0) >= 4}
    missing = [s for s in stages if s not in by_stage]
    if missing or not stages:
        raise ValueError(
            f"{type(model).__name__}: no timm feature_info for stages {missing or list(stages)} "
            f"(has {sorted(by_stage)}); fpn_backbone needs a timm CNN"
        )
    picked = [by_stage[s] for s in stages]
    return BackboneWithFPN(
        model,
        return_layers={i["module"]: str(n) for n, i in enumerate(picked)},
        in_channels_list=[i["num_chs"] for i in picked],
        out_channels=out_channels,
    )
