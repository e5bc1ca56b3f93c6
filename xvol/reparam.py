"""The one entry point that turns a trained model into its deploy form."""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["reparameterize_model", "is_reparameterizable"]


def is_reparameterizable(module: nn.Module) -> bool:
    return callable(getattr(module, "reparameterize", None))


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Swap every module that has ``reparameterize() -> nn.Module`` for its deploy module.

    BN folding needs running statistics, so the model is put in eval mode first; with
    ``inplace=False`` (default) this happens on a deep copy and ``model`` is left untouched
    ("avoid editing original graph", as MobileOne puts it). The result is in eval mode.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if is_reparameterizable(model):
        return model.reparameterize()
    _swap_children(model)
    return model


def _swap_children(parent: nn.Module) -> None:
    for name, child in parent.named_children():
        if is_reparameterizable(child):
            setattr(parent, name, child.reparameterize())
        else:
            _swap_children(child)
