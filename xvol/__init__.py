"""xvol: ImageNet training with X-volution, convolution and self-attention in one operator.

``import xvol`` registers the xresnet models with timm and offers ``xvol.convert`` (X-volution
in another CNN) and ``xvol.plan_convert`` (its dry run); nothing else: the Hydra resolvers
(``${xvol_run_id:}``, ``${xvol_linear_lr:...}``) are registered by ``import xvol.config``, which
the training entry point and the config tools do, so ``import xvol.ops`` needs no omegaconf.
"""

__version__ = "0.1.0"

import xvol.models  # noqa: E402,F401  (registers the xresnet family with timm)
from xvol.models.convert import convert, plan_convert  # noqa: E402

__all__ = ["convert", "plan_convert"]
