"""Invertible layers. Each has ``forward(x, cond=None) -> (y, logdet)`` and
``inverse(y, cond=None) -> x``, with ``logdet`` of shape (B,)."""

from flowpp.layers.actnorm import ActNorm
from flowpp.layers.coupling import MixLogisticCoupling
from flowpp.layers.pointwise import Pointwise
from flowpp.layers.preprocess import LogitPreprocess, sigmoid_logdet
from flowpp.layers.reshape import Flip, SpaceToDepth, half_shape, merge_halves, split_halves

__all__ = [
    "ActNorm",
    "Flip",
    "LogitPreprocess",
    "MixLogisticCoupling",
    "Pointwise",
    "SpaceToDepth",
    "half_shape",
    "merge_halves",
    "sigmoid_logdet",
    "split_halves",
]
