"""Operators: X-volution (training and deploy forms) and its kernel algebra."""

from xvol.ops.xconv import XConv2d, XConv2dDeploy, pssa_offsets, pssa_transform

__all__ = ["XConv2d", "XConv2dDeploy", "pssa_offsets", "pssa_transform"]
