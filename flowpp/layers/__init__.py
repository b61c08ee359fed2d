"""Invertible layers. Each has ``forward(x, cond=None) -> (y, logdet)`` and
``inverse(y, cond=None) -> x``, with ``logdet`` of shape (B,)."""

from flowpp.layers.actnorm import ActNorm
from flowpp.layers.coupling import MixLogisticCoupling
from flowpp.layers.pointwise import Pointwise
from flowpp.layers.preprocess import LogitPreprocess, sigmoid_logdet
from flowpp.layers.reshape import Flip, SpaceToDepth, half_shape, merge_halves, split_halves
from flowpp.layers.sequential import InvertibleSequential, chain_forward, chain_inverse

__all__ = [
    "ActNorm",
    "Flip",
    "InvertibleSequential",
    "LogitPreprocess",
    "MixLogisticCoupling",
    "Pointwise",
    "SpaceToDepth",
    "chain_forward",
    "chain_inverse",
    "half_shape",
    "merge_halves",
    "sigmoid_logdet",
    "split_halves",
]
