"""Helpers for tests/test_tools*.py: make checkpoints and val folders.

Checkpoints are made without training: build the model from a stored-style config, give every BN
random statistics (default BN init would make folding an identity and hide bugs), and save the
dict in the training checkpoint format (xvol/formats/checkpoint.py) with ``save_checkpoint``.
Hostile inputs too: model configs whose ``_target_`` would create a file if anything
instantiated them, checkpoints with NaN weights, and format 1 deploy directories (as the
xvol-reparam of before the model spec wrote them).
"""

from __future__ import annotations

import json
import pathlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from helpers import randomize_bn
from PIL import Image
from torch import nn

from xvol.formats.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from xvol.models import ModelSpec

ROOT = Path(__file__).resolve().parents[1]

__all__ = [
    "ROOT",
    "CRAFTED",
    "class_names",
    "crafted_model_config",
    "make_checkpoint",
    "make_v1_deploy",
    "make_val_folder",
    "model_config",
    "poison_checkpoint",
]


def model_config(arch: str = "resnet18", xvolution: bool = True, num_classes: int = 3) -> dict:
    """What scripts/train.py stores as config["model"] (configs/model/xresnet18.yaml resolved)."""
    cfg: dict[str, Any] = {
        "_target_": "xvol.models.build_model",
        "arch": arch,
        "num_classes": num_classes,
        "stages": [],
        "xconv": None,
        "drop_path_rate": 0.0,
        "drop_rate": 0.0,
        "zero_init_last": True,
    }
    if xvolution:
        cfg["stages"] = [3]
        cfg["xconv"] = {
            "_target_": "xvol.ops.XConv2d",
            "_partial_": True,
            "shifts": [1],
            "center": False,
        }
    return cfg


def _random_model(cfg: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = ModelSpec.from_config(cfg).build()
    model = randomize_bn(model, torch.Generator().manual_seed(seed))
    # Random BN statistics give pooled features with a large common component (every image gets
    # the same class) and logits ~200. Centre and scale the classifier on a random batch so that
    # predictions depend on the image and logits are ~10, the scale of a trained classifier that
    # absolute tolerances (1e-4 for ONNX) are meant for.
    model.eval()
    with torch.no_grad():
        x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        fc = model.get_classifier()
        centred = feats - feats.mean(0)
        fc.weight.mul_(5.0 / (centred @ fc.weight.t()).std().clamp_min(1e-6))
        fc.bias.copy_(-fc.weight @ feats.mean(0))
    return model


def make_checkpoint(
    path: Path,
    cfg: dict | None = None,
    *,
    ema: bool = True,
    seed: int = 0,
    data_root: str | None = None,
    img_size: int = 32,
    weights_cfg: dict | None = None,
    names: list[str] | None = None,
    run_config: dict | None = None,
) -> Path:
    """A training-format checkpoint of ``cfg`` with random weights and BN statistics.

    ``weights_cfg`` stores the weights of another model under ``cfg`` (a checkpoint whose
    weights do not belong to its stated architecture, or whose config is crafted). The class
    names default to make_val_folder's folders (``class_0``, ...). ``run_config`` adds keys to
    the stored config, as scripts/train.py stores them (``seed``, ``optim``, ...).
    """
    cfg = cfg or model_config()
    model = _random_model(weights_cfg or cfg, seed)
    ema_model = _random_model(weights_cfg or cfg, seed + 1000) if ema else None
    num_classes = cfg.get("num_classes") or (weights_cfg or {}).get("num_classes", 3)
    state = {
        "format_version": FORMAT_VERSION,
        "kind": "xvol.train",
        "model": model.state_dict(),
        "ema": ema_model.state_dict() if ema_model is not None else None,
        "optimizer": {},
        "scheduler": None,
        "scaler": None,
        "epoch": 1,
        "step": 0,
        "global_step": 10,
        "epoch_state": {},
        "world_size": 1,
        "rng": [],
        "bn_buffers": None,
        "config": {
            "model": cfg,
            "data": {
                "name": "tiny",
                "root": data_root,
                "num_classes": num_classes,
                "img_size": img_size,
                "eval_img_size": None,
                "crop_pct": 1.0,
                "interpolation": "bilinear",
            },
            **(run_config or {}),
        },
        "class_names": names if names is not None else class_names(num_classes),
        "metrics": {},
        "best_metric": None,
        "wandb_id": None,
        "git": {"revision": None, "dirty": None},
        "versions": {},
        "time": 0.0,
    }
    return save_checkpoint(state, path)


def class_names(num_classes: int = 3) -> list[str]:
    """make_val_folder's class folders, in label order."""
    return [f"class_{c}" for c in range(num_classes)]


def poison_checkpoint(path: Path, out: Path, key: str = "fc.weight") -> Path:
    """A copy of a training checkpoint with one NaN in ``key`` of its model and EMA weights."""
    state = load_checkpoint(path)
    for weights in ("model", "ema"):
        if state.get(weights) is not None:
            state[weights][key].view(-1)[0] = float("nan")
    return save_checkpoint(state, out)


def _touch_pickle(marker: Path, path: Path) -> Path:
    """A torch.save file whose unpickling (weights_only=False) creates ``marker``."""

    class Touch:
        def __reduce__(self) -> tuple:
            return (pathlib.Path.touch, (pathlib.Path(marker),))

    torch.save(Touch(), path)
    return path


# Model configs that create a file when hydra.utils.instantiate sees them (each was checked to
# do so against the tools of before the model spec).
CRAFTED = ("touch", "torch_load", "xconv_touch", "kwarg_touch")


def crafted_model_config(kind: str, marker: Path) -> dict[str, Any]:
    """A stored model config that would create ``marker`` if anything instantiated it."""
    touch = {"_target_": "pathlib.Path.touch", "self": str(marker)}
    if kind == "touch":
        return touch
    if kind == "torch_load":
        evil = _touch_pickle(marker, marker.with_name(marker.name + ".evil.pt"))
        return {"_target_": "torch.load", "f": str(evil), "weights_only": False}
    cfg = model_config()
    if kind == "xconv_touch":  # the trusted builder, an untrusted slot
        cfg["xconv"] = {**touch, "_partial_": False}
        return cfg
    if kind == "kwarg_touch":  # a node where a timm kwarg belongs
        cfg["drop_path_rate"] = touch
        return cfg
    raise AssertionError(kind)


def make_v1_deploy(deploy: Path, out: Path, cfg: dict) -> Path:
    """``deploy`` (format 2, of a model whose stored config is ``cfg``) rewritten as format 1.

    Format 1 (xvol-reparam before the model spec): the sidecar holds ``model_config`` (the raw
    stored config) instead of model_spec/class_names/integrity_sha256, and the safetensors
    metadata holds the same config as JSON.
    """
    from safetensors.torch import load_file, save_file

    from xvol.formats.files import sha256_file

    out.mkdir(parents=True)
    sidecar = json.loads((deploy / "deploy.json").read_text())
    metadata = {"format": "pt", "kind": "xvol.deploy", "model_config": json.dumps(cfg)}
    save_file(load_file(deploy / "deploy.safetensors"), out / "deploy.safetensors", metadata)
    for key in ("model_spec", "class_names", "integrity_sha256"):
        sidecar.pop(key)
    sidecar.update(
        format_version=1,
        model_config=cfg,
        weights_sha256=sha256_file(out / "deploy.safetensors"),
    )
    (out / "deploy.json").write_text(json.dumps(sidecar, indent=2))
    return out


def make_val_folder(
    root: Path, num_classes: int = 3, per_class: int = 4, size: int = 32, seed: int = 0
) -> Path:
    """``root/val/<class>/*.JPEG`` of random-noise images; returns ``root``."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / "val" / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # a random colour, gradient and noise level per image: varied enough that a random
            # network does not give every image the same class
            colour = rng.uniform(0, 255, 3)
            ramp = np.linspace(-1, 1, size)[:, None, None] * rng.uniform(-120, 120, 3)
            noise = rng.normal(0, rng.uniform(5, 80), (size, size, 3))
            pixels = np.clip(colour + ramp + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.JPEG", quality=95)
    return root
