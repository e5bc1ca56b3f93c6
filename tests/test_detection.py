"""xvol.models.fpn_backbone: an xresnet50 under torchvision's Faster R-CNN (the paper's COCO
setting), one training step on synthetic images, and the deploy form's features."""

from __future__ import annotations

import pytest
import torch
from test_convert import randomize_for_reparam, relative_error
from torchvision.models.detection import FasterRCNN

from xvol.models import fpn_backbone
from xvol.ops import XConv2d, XConv2dDeploy
from xvol.reparam import reparameterize_model


def synthetic_targets(n: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    targets = []
    for _ in range(n):
        xy = torch.randint(0, 24, (2, 2), generator=gen).float()
        boxes = torch.cat([xy, xy + 12 + torch.randint(0, 16, (2, 2), generator=gen)], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 3, (2,), generator=gen)})
    return targets


def test_faster_rcnn_with_an_xresnet50_fpn_trains_one_step() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    backbone = fpn_backbone("xresnet50")
    assert sum(isinstance(m, XConv2d) for m in backbone.modules()) == 6
    detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64)
    images = list(torch.rand(2, 3, 64, 64, generator=gen))
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    losses = detector.train()(images, synthetic_targets(2, gen))
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    slot = backbone.body.layer3[1].conv2
    loss.backward()
    optimizer.step()
    # bn3 starts at zero (timm's zero_init_last): the slot's gradient flows through the FPN
    # once bn3 learns; its own BN gammas and the bn3 gamma get gradients at once
    assert backbone.body.layer3[1].bn3.weight.grad.abs().sum() > 0
    assert slot.pssa.weight.grad is not None
    detector.eval()
    with torch.no_grad():
        (out,) = detector([images[0]])
    assert set(out) == {"boxes", "labels", "scores"}


def test_deploy_backbone_features_equal_the_training_form() -> None:
    torch.manual_seed(0)
    backbone = fpn_backbone("xresnet50", out_channels=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    randomize_for_reparam(backbone, x)
    deploy = reparameterize_model(backbone)
    assert not any(isinstance(m, XConv2d) for m in deploy.modules())
    assert sum(isinstance(m, XConv2dDeploy) for m in deploy.modules()) == 6
    with torch.no_grad():
        ref, out = backbone(x), deploy(x)
    assert list(out) == list(ref) == ["0", "1", "2", "3", "pool"]
    for level in ref:
        assert relative_error(out[level], ref[level]) <= 1e-5, level


def test_fpn_backbone_names_what_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="no timm feature_info for stages"):
        fpn_backbone(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match=r"stages \[5\]"):
        fpn_backbone("resnet18", stages=(3, 5))
