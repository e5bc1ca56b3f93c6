"""xvol: ImageNet training with X-volution, convolution and self-attention in one operator.

``import xvol`` registers the xresnet models with timm and nothing else: the Hydra resolvers
(``${xvol_run_id:}``, ``${xvol_linear_lr:...}``) are registered by ``import xvol.config``, which
the training entry point and the config tools do, so ``import xvol.ops`` needs no omegaconf.
"""

__version__ = "0.1.0"

import xvol.models  # noqa: E402,F401  (registers xresnet18/34/50/101/152 with timm)
