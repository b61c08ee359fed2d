"""Model configs and the named presets, as the official launchers build them.

A config is plain frozen data: ``to_dict`` / ``from_dict`` round-trip it through
JSON, YAML, MLflow params and safetensors metadata.

``stages`` describe a flow left to right: ``"s2d"`` is a space-to-depth, and
``"stripe:N"`` / ``"channel:N"`` are N flow steps on that split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NetConfig:
    """A coupling net: pos-emb, 3x3 conv to ``hidden``, ``num_blocks`` blocks, 3x3 conv out."""

    hidden: int = 96
    """F, the width of every block."""
    num_blocks: int = 10
    """B, blocks of [gated conv, LN, gated attention, LN]."""
    num_heads: int = 4
    attention: bool = True
    """False drops the attention half of each block (the ImageNet 64x64 dequantizer)."""
    use_nin: bool = True
    """The gated conv's second conv is 1x1 (True) or 3x3."""
    layer_norm: bool = True
    final_concat_elu: bool = False
    """concat_elu before the output conv, as the ImageNet launchers do."""
    weight_norm: bool = False


@dataclass(frozen=True)
class ContextConfig:
    """The dequantizer's context net on x/L - 0.5, its stripe halves concatenated."""

    hidden: int = 32
    num_blocks: int = 3
    layer_norm: bool = False
    attention: bool = False
    num_heads: int = 4


@dataclass(frozen=True)
class DequantConfig:
    kind: str = "variational"
    """``variational`` (a conditional flow for u) or ``uniform`` (u ~ U[0, 1), for ablation)."""
    stages: tuple[str, ...] = ("stripe:4",)
    net: NetConfig = field(default_factory=NetConfig)
    context: ContextConfig = field(default_factory=ContextConfig)


@dataclass(frozen=True)
class FlowConfig:
    image_size: int = 32
    channels: int = 3
    num_bits: int = 8
    """8 for {0..255}; 5 for {0..31}."""
    num_components: int = 32
    """K, logistic mixture components in every coupling (main flow and dequantizer)."""
    dropout: float = 0.0
    pointwise: bool = False
    """The per-half 1x1 convolution in each flow step (CIFAR-10 only)."""
    stages: tuple[str, ...] = ("stripe:4", "s2d", "channel:2", "stripe:3")
    net: NetConfig = field(default_factory=NetConfig)
    dequant: DequantConfig = field(default_factory=DequantConfig)
    bf16: bool = False
    """Run the coupling nets under bf16 autocast; the mixture maths stays float32."""
    checkpoint: str = "none"
    """Activation checkpointing applied at build time: ``none``, ``attention`` or ``all``."""
    compile: bool = False
    """``torch.compile`` every coupling and the context net at build time (flowpp.compile)."""
    compile_mode: str = "default"
    """``default``, ``reduce-overhead`` (CUDA graphs), ``max-autotune`` or ``max-autotune-no-cudagraphs``."""
    channels_last: bool = False
    """Keep the convolution weights (and so their activations) in channels-last memory format."""

    @property
    def num_levels(self) -> int:
        return 2**self.num_bits

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def replace(self, **changes) -> FlowConfig:
        return dataclasses.replace(self, **changes)

    def for_inference(self) -> FlowConfig:
        """This config without the training-time build options (checkpointing, compile)."""
        return self.replace(checkpoint="none", compile=False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FlowConfig:
        d = dict(d)
        dq = dict(d.pop("dequant", {}))
        dequant = DequantConfig(
            kind=dq.get("kind", "variational"),
            stages=tuple(dq.get("stages", ("stripe:4",))),
            net=NetConfig(**dq.get("net", {})),
            context=ContextConfig(**dq.get("context", {})),
        )
        net = NetConfig(**d.pop("net", {}))
        if "stages" in d:
            d["stages"] = tuple(d["stages"])
        return cls(**d, net=net, dequant=dequant)


def _debug() -> FlowConfig:
    return FlowConfig(
        image_size=16,
        num_components=4,
        stages=("stripe:2", "s2d", "channel:2", "stripe:2"),
        net=NetConfig(hidden=16, num_blocks=1, num_heads=2, final_concat_elu=True),
        dequant=DequantConfig(
            stages=("stripe:2",),
            net=NetConfig(hidden=16, num_blocks=1, attention=False, final_concat_elu=True),
            context=ContextConfig(hidden=8, num_blocks=1, layer_norm=True),
        ),
    )


def _cifar10() -> FlowConfig:
    return FlowConfig(
        image_size=32,
        num_components=32,
        dropout=0.2,
        pointwise=True,
        stages=("stripe:4", "s2d", "channel:2", "stripe:3"),
        net=NetConfig(hidden=96, num_blocks=10),
        dequant=DequantConfig(
            stages=("stripe:4",),
            net=NetConfig(hidden=96, num_blocks=2),
            context=ContextConfig(hidden=32, num_blocks=3),
        ),
    )


def _imagenet32() -> FlowConfig:
    net = NetConfig(hidden=128, num_blocks=20, final_concat_elu=True, weight_norm=True)
    return FlowConfig(
        image_size=32,
        num_components=32,
        stages=("stripe:4", "stripe:3", "s2d", "channel:3", "stripe:3"),
        net=net,
        dequant=DequantConfig(
            stages=("stripe:4", "stripe:4"),
            net=dataclasses.replace(net, num_blocks=8),
            context=ContextConfig(hidden=32, num_blocks=8, layer_norm=True, attention=True),
        ),
    )


def _imagenet64(num_bits: int = 8) -> FlowConfig:
    net = NetConfig(hidden=96, num_blocks=16, final_concat_elu=True)
    return FlowConfig(
        image_size=64,
        num_bits=num_bits,
        num_components=4,
        stages=("s2d", "stripe:4", "s2d", "channel:2", "stripe:2", "s2d", "channel:2", "stripe:2"),
        net=net,
        dequant=DequantConfig(
            stages=("stripe:4",),
            net=dataclasses.replace(net, num_blocks=5, attention=False),
            context=ContextConfig(hidden=32, num_blocks=5, layer_norm=True),
        ),
    )


PRESETS = {
    "debug": _debug,
    "cifar10": _cifar10,
    "imagenet32": _imagenet32,
    "imagenet64": _imagenet64,
    "imagenet64_5bit": lambda: _imagenet64(num_bits=5),
}

# Parameter counts of the official TensorFlow launchers, for the preset tests.
OFFICIAL_PARAM_COUNTS = {
    "cifar10": 31_443_440,
    "imagenet32": 168_955_724,
    "imagenet64": 73_489_960,
    "imagenet64_5bit": 73_489_960,
}


def get_preset(name: str, **overrides) -> FlowConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
