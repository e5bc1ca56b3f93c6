"""Data backends behind one contract (see base.py).

Builders, referenced from configs/data/*.yaml: xvol.data.imagenet.build (torchvision),
xvol.data.dali.build (DALI, imported lazily), xvol.data.synthetic.build, xvol.data.demo.build.
"""

from xvol.data.base import DataBundle, EvalLoader, TrainLoader
from xvol.data.folder import IMAGENET_MEAN, IMAGENET_STD, DataError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DataBundle", "DataError", "EvalLoader", "TrainLoader"]
