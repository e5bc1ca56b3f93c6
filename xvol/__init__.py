"""xvol: ImageNet training with X-volution, convolution and self-attention in one operator."""

__version__ = "0.1.0"

from xvol.config import register_resolvers  # noqa: E402

register_resolvers()
import xvol.models  # noqa: E402,F401  (registers xresnet18/34/50/101/152 with timm)
