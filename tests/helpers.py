"""Shared test helpers: tiny float64 models and the Jacobian check."""

from __future__ import annotations

import dataclasses

import torch

from flowpp import FlowPlusPlus, get_preset
from flowpp.distributed import data_dependent_init


def tiny_config(image_size: int = 4, **overrides):
    """The debug preset at a capped size, float64-friendly."""
    return get_preset("debug").replace(image_size=image_size, **overrides)


def net_overrides(cfg, **changes):
    return cfg.replace(net=dataclasses.replace(cfg.net, **changes))


def initialized_model(cfg, batch: int = 8, seed: int = 0, perturb: float = 0.02) -> FlowPlusPlus:
    """A float64 model after data-dependent init, with every parameter nudged off its init
    so that no test passes only because a layer starts near the identity."""
    torch.manual_seed(seed)
    model = FlowPlusPlus(cfg).double()
    data_dependent_init(model, random_images(batch, cfg.image_size, cfg.num_levels, seed))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval()


def random_images(n, size, num_levels=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_levels, (n, 3, size, size), generator=g)


def jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """slogdet of the autograd Jacobian of fn at one sample x (1, ...)."""
    flat = x.reshape(-1)

    def f(v):
        return fn(v.reshape(x.shape)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, flat)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0, "Jacobian is singular"
    return logabsdet


def rendezvous(tmp_path) -> str:
    """A fresh file store for a gloo process group of spawned ranks: a TCP port picked free and
    bound later by rank 0 can be taken in between by another test's process (CI: a rank aborted)."""
    import uuid

    return f"file://{tmp_path}/store-{uuid.uuid4().hex}"
