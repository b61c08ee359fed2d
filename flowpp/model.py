"""FlowPlusPlus: dequantizer + a flat list of invertible steps + N(0, I) prior.

Reads top to bottom: a flow step, how a stage list becomes steps, then the model.
Pixels are integers in [0, L) with L = 2**num_bits; every likelihood is on that
discrete scale, so bits/dim = -log2 P(x) / D.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flowpp.dequant import UniformDequantizer, VariationalDequantizer, standard_normal_log_prob
from flowpp.layers import (
    ActNorm,
    Flip,
    LogitPreprocess,
    MixLogisticCoupling,
    Pointwise,
    SpaceToDepth,
    half_shape,
)
from flowpp.nets import ContextNet
from flowpp.presets import FlowConfig, NetConfig


class FlowStep(nn.Module):
    """[ActNorm, (Pointwise), coupling, flip] on one split."""

    def __init__(self, shape, split, *, num_components, net: NetConfig, dropout, pointwise, bf16, context_channels=0):
        super().__init__()
        self.actnorm = ActNorm(shape)
        self.pointwise = Pointwise(half_shape(shape, split)[0], split) if pointwise else None
        self.coupling = MixLogisticCoupling(
            shape,
            split,
            num_components=num_components,
            bf16=bf16,
            dropout=dropout,
            context_channels=context_channels,
            **_net_kwargs(net),
        )
        self.flip = Flip(split)

    def _layers(self):
        return [m for m in (self.actnorm, self.pointwise, self.coupling, self.flip) if m is not None]

    def forward(self, x, cond=None):
        logdet = x.new_zeros(x.shape[0])
        for layer in self._layers():
            x, ld = layer(x, cond)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y, cond=None):
        for layer in reversed(self._layers()):
            y = layer.inverse(y, cond)
        return y


def _net_kwargs(net: NetConfig) -> dict:
    return dict(
        hidden=net.hidden,
        num_blocks=net.num_blocks,
        attention=net.attention,
        num_heads=net.num_heads,
        use_nin=net.use_nin,
        layer_norm=net.layer_norm,
        final_concat_elu=net.final_concat_elu,
        weight_norm=net.weight_norm,
    )


def build_steps(stages, shape, cfg: FlowConfig, net: NetConfig, context_channels=0):
    """Stage strings -> (list of steps, final (C, H, W))."""
    steps = []
    for stage in stages:
        if stage == "s2d":
            steps.append(SpaceToDepth())
            c, h, w = shape
            shape = (4 * c, h // 2, w // 2)
            continue
        split, _, count = stage.partition(":")
        if split not in ("stripe", "channel") or not count.isdigit():
            raise ValueError(f"bad stage {stage!r}: expected 's2d', 'stripe:N' or 'channel:N'")
        for _ in range(int(count)):
            steps.append(
                FlowStep(
                    shape,
                    split,
                    num_components=cfg.num_components,
                    net=net,
                    dropout=cfg.dropout,
                    pointwise=cfg.pointwise,
                    bf16=cfg.bf16,
                    context_channels=context_channels,
                )
            )
    return steps, shape


def build_dequantizer(cfg: FlowConfig) -> nn.Module:
    dq = cfg.dequant
    if dq.kind == "uniform":
        return UniformDequantizer()
    if dq.kind != "variational":
        raise ValueError(f"dequant.kind={dq.kind!r}: expected 'variational' or 'uniform'")
    c, h, w = cfg.shape
    ctx = dq.context
    context = ContextNet(
        2 * c,
        (h, w // 2),
        hidden=ctx.hidden,
        num_blocks=ctx.num_blocks,
        layer_norm=ctx.layer_norm,
        attention=ctx.attention,
        num_heads=ctx.num_heads,
        dropout=cfg.dropout,
        weight_norm=dq.net.weight_norm,
    )
    steps, _ = build_steps(dq.stages, cfg.shape, cfg, dq.net, context_channels=ctx.hidden)
    return VariationalDequantizer(cfg.shape, cfg.num_levels, context, steps)


class FlowPlusPlus(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.num_levels = config.num_levels
        self.dequantizer = build_dequantizer(config)
        steps, self.latent_shape = build_steps(config.stages, config.shape, config, config.net)
        self.flow = nn.ModuleList([LogitPreprocess(config.num_levels), *steps])

    @property
    def num_dims(self) -> int:
        return math.prod(self.config.shape)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -- the bijection y in [0, L)^D <-> z ------------------------------------------------
    def flow_forward(self, y: torch.Tensor):
        logdet = y.new_zeros(y.shape[0])
        for step in self.flow:
            y, ld = step(y)
            logdet = logdet + ld
        return y, logdet

    def flow_inverse(self, z: torch.Tensor) -> torch.Tensor:
        for step in reversed(self.flow):
            z = step.inverse(z)
        return z

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """log p(y) of continuous y in [0, L)^D, per image, in nats."""
        z, logdet = self.flow_forward(y)
        return standard_normal_log_prob(z) + logdet

    # -- likelihoods of discrete images ---------------------------------------------------
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """One-sample dequantization lower bound on log P(x), per image (B,), in nats."""
        u, log_q = self.dequantizer(x, dtype=self._dtype())
        return self.log_density(x.to(u.dtype) + u) - log_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """-log2 P(x) / D per image, on the 2**num_bits scale."""
        return -self.log_prob(x) / (self.num_dims * math.log(2))

    @torch.no_grad()
    def importance_weighted_log_prob(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """log (1/S) sum_s p(x + u_s) / q(u_s | x): tighter than log_prob, -> log P(x) as S grows."""
        terms = torch.stack([self.log_prob(x) for _ in range(num_samples)])  # (S, B)
        return torch.logsumexp(terms, dim=0) - math.log(num_samples)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None):
        """n images as uint8 (n, C, H, W), from z ~ N(0, temperature^2 I)."""
        device, dtype = next(self.parameters()).device, self._dtype()
        z = torch.randn((n, *self.latent_shape), generator=generator, device=device, dtype=dtype)
        y = self.flow_inverse(z * temperature)
        return y.floor().clamp(0, self.num_levels - 1).to(torch.uint8)


def build_model(config: FlowConfig) -> FlowPlusPlus:
    """The model with the config's build-time wrappers (activation checkpointing) applied."""
    from flowpp.checkpointing import apply_checkpointing

    model = FlowPlusPlus(config)
    apply_checkpointing(model, config.checkpoint)
    return model
