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
    InvertibleSequential,
    LogitPreprocess,
    MixLogisticCoupling,
    Pointwise,
    SpaceToDepth,
    chain_forward,
    chain_inverse,
    half_shape,
)
from flowpp.nets import ContextNet
from flowpp.presets import FlowConfig, NetConfig


class FlowStep(nn.Module):
    """[ActNorm, (Pointwise), coupling, flip] on one split of a (B, C, H, W) tensor.

    The layers are named attributes rather than a list, so that state_dict keys read
    ``flow.3.coupling.net...``; ``cond`` is the dequantizer's context (or None).
    """

    def __init__(self, shape, split, cfg: FlowConfig, net: NetConfig, context_channels=0):
        super().__init__()
        self.actnorm = ActNorm(shape)
        self.pointwise = Pointwise(half_shape(shape, split)[0], split) if cfg.pointwise else None
        self.coupling = MixLogisticCoupling(
            shape,
            split,
            num_components=cfg.num_components,
            net=net,
            bf16=cfg.bf16,
            dropout=cfg.dropout,
            context_channels=context_channels,
        )
        self.flip = Flip(split)

    def _layers(self):
        return [m for m in (self.actnorm, self.pointwise, self.coupling, self.flip) if m is not None]

    def forward(self, x, cond=None):
        return chain_forward(self._layers(), x, cond)

    def inverse(self, y, cond=None):
        return chain_inverse(self._layers(), y, cond)


def build_steps(stages, shape, cfg: FlowConfig, net: NetConfig, context_channels=0):
    """Stage strings -> (list of steps, final (C, H, W))."""
    steps: list[nn.Module] = []
    for stage in stages:
        if stage == "s2d":
            steps.append(SpaceToDepth())
            c, h, w = shape
            shape = (4 * c, h // 2, w // 2)
            continue
        split, _, count = stage.partition(":")
        if split not in ("stripe", "channel") or not count.isdigit():
            raise ValueError(f"bad stage {stage!r}: expected 's2d', 'stripe:N' or 'channel:N'")
        steps.extend(FlowStep(shape, split, cfg, net, context_channels) for _ in range(int(count)))
    return steps, shape


def build_dequantizer(cfg: FlowConfig) -> UniformDequantizer | VariationalDequantizer:
    """q(u | x): its context net sees the two stripe halves of x side by side, (B, 2C, H, W/2),
    and conditions every coupling net of the dequantizer's flow steps."""
    dq = cfg.dequant
    if dq.kind == "uniform":
        return UniformDequantizer()
    if dq.kind != "variational":
        raise ValueError(f"dequant.kind={dq.kind!r}: expected 'variational' or 'uniform'")
    c, h, w = cfg.shape
    context = ContextNet(2 * c, (h, w // 2), dq.context, dropout=cfg.dropout, weight_norm=dq.net.weight_norm)
    steps, _ = build_steps(dq.stages, cfg.shape, cfg, dq.net, context_channels=dq.context.hidden)
    return VariationalDequantizer(cfg.shape, cfg.num_levels, context, steps)


class FlowPlusPlus(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.num_levels = config.num_levels
        self.dequantizer: UniformDequantizer | VariationalDequantizer = build_dequantizer(config)
        steps, self.latent_shape = build_steps(config.stages, config.shape, config, config.net)
        self.flow = InvertibleSequential([LogitPreprocess(config.num_levels), *steps])

    @property
    def num_dims(self) -> int:
        return math.prod(self.config.shape)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -- the bijection y in [0, L)^D <-> z: ``self.flow(y) -> (z, logdet)``, ``self.flow.inverse(z)``
    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """log p(y) of continuous y in [0, L)^D, per image, in nats."""
        z, logdet = self.flow(y)
        return standard_normal_log_prob(z) + logdet

    # -- likelihoods of discrete images ---------------------------------------------------
    def check_pixels(self, x: torch.Tensor) -> None:
        """Integer pixels in [0, 2**num_bits), or an error naming the range.

        A uint8 batch of an 8-bit model cannot be out of range, so it costs nothing. Another
        batch on the CPU is checked at once (a ValueError); on a GPU the check is queued on the
        device (``torch._assert_async``), so the forward pass never waits for it: a 5-bit
        model's every forward would otherwise sync on the batch's min and max.
        """
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"pixels must be integers in [0, {self.num_levels}), got a {x.dtype} tensor")
        if x.dtype == torch.uint8 and self.num_levels == 256:
            return
        bits = self.config.num_bits
        expected = f"pixel values must lie in [0, {self.num_levels}) for a {bits}-bit model"
        if x.device.type != "cpu":
            in_range = ((x >= 0) & (x < self.num_levels)).all()
            hint = f"; reduce 8-bit pixels with x >> {8 - bits} first" if bits < 8 else ""
            torch._assert_async(in_range, expected + hint)
            return
        lo, hi = (int(v) for v in torch.aminmax(x))
        if lo < 0 or hi >= self.num_levels:
            raise ValueError(
                f"{expected}, got [{lo}, {hi}]"
                + (f"; reduce 8-bit pixels with x >> {8 - bits} first" if bits < 8 and hi < 256 else "")
            )

    def log_prob(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One-sample dequantization lower bound on log P(x), per image (B,), in nats.

        ``x``: integer pixels (B, C, H, W) in [0, 2**num_bits), any integer dtype. ``noise``: the
        dequantizer's noise for ``x`` (``dequantizer.draw``), or None to draw it from torch's
        generator; a caller that fixes it per image makes the bound independent of how the
        images are batched.
        """
        self.check_pixels(x)
        u, log_q = self.dequantizer(x, dtype=self._dtype(), noise=noise)
        return self.log_density(x.to(u.dtype) + u) - log_q

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_prob(x, noise)

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
        y = self.flow.inverse(z * temperature)
        return y.floor().clamp(0, self.num_levels - 1).to(torch.uint8)


def build_model(config: FlowConfig) -> FlowPlusPlus:
    """The model with the config's build-time options applied: activation checkpointing,
    channels-last weights and ``torch.compile`` (lazy: it traces on the first call after
    the data-dependent init, which runs eagerly)."""
    from flowpp.activation_checkpointing import apply_checkpointing
    from flowpp.compile import compile_model

    model = FlowPlusPlus(config)
    apply_checkpointing(model, config.checkpoint)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (torch's stubs lack it)
    if config.compile:
        compile_model(model, config.compile_mode)
    return model
