"""Data backends behind one contract (see base.py).

Builders, referenced from configs/data/*.yaml: xvol.data.imagenet.build (torchvision),
xvol.data.dali.build (DALI, imported lazily), xvol.data.synthetic.build, xvol.data.demo.build.
The tools' val loader over any ImageNet-layout val folder: xvol.data.val.
"""

from xvol.data.base import DataBundle, EvalLoader, TrainLoader
from xvol.data.folder import IMAGENET_MEAN, IMAGENET_STD, DataError
from xvol.data.val import ValData, build_val_loader, eval_settings, resolve_val_dir

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataBundle",
    "DataError",
    "EvalLoader",
    "TrainLoader",
    "ValData",
    "build_val_loader",
    "eval_settings",
    "resolve_val_dir",
]
