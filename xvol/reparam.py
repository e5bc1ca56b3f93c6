"""The one entry point that turns a trained model into its deploy form.

X-volution modules follow timm's re-parameterization protocol: ``fuse() -> nn.Module`` (BN
folded with running statistics, ``self`` untouched). So ``timm.utils.reparameterize_model``
(timm's validate.py / benchmark.py ``--reparam``) converts an xresnet, and xvol's helper below
is timm's walk on a deep copy in eval mode.
"""

from __future__ import annotations

import copy

from timm.utils.model import reparameterize_model as timm_reparameterize_model
from torch import nn

__all__ = ["reparameterize_model", "is_reparameterizable"]


def is_reparameterizable(module: nn.Module) -> bool:
    """Whether timm's walk would replace or convert ``module`` (``fuse``, ``reparameterize``
    or ``switch_to_deploy``)."""
    return any(
        callable(getattr(module, name, None))
        for name in ("fuse", "reparameterize", "switch_to_deploy")
    )


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Every re-parameterizable module of ``model`` swapped for its deploy form.

    BN folding uses running statistics, so the model is put in eval mode first; with
    ``inplace=False`` (default) this happens on a deep copy and ``model`` is left untouched
    ("avoid editing original graph", as MobileOne puts it). The result is in eval mode. A bare
    X-volution module (no parent to swap it in) is returned as its ``fuse()``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if callable(getattr(model, "fuse", None)):
        return model.fuse()
    return timm_reparameterize_model(model, inplace=True)
