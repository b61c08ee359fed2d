"""Flow++ (Ho et al., 2019) in PyTorch: the model only, no training infrastructure."""

from flowpp.model import FlowPlusPlus, build_model
from flowpp.presets import PRESETS, FlowConfig, get_preset

__all__ = ["PRESETS", "FlowConfig", "FlowPlusPlus", "build_model", "get_preset"]
