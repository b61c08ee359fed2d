"""``torch.compile`` for the model, one coupling at a time.

What gets compiled: every mixture-of-logistics coupling (its coupling net *and* the
mixture maths, which the compiler fuses into a few kernels) and the dequantizer's
context net. The flow's cheap glue (ActNorm, flips, space-to-depth) stays eager.

Every target shares one ``forward`` code object, so dynamo keeps one cache for all of
them and tells them apart by guards. Couplings come in a few *shape classes* (the
split, the half's shape and the context width decide the tensors they see), and each
class is compiled once, statically (``dynamic=False``, so CUDA graphs apply): the
recompile limit is raised to hold every class in training and in evaluation, with
room for a ragged last evaluation batch. Nothing recompiles as a step moves from one
coupling to the next.

Compiling is lazy: nothing is traced until the first compiled call. The data-dependent
init must run eagerly first (``flowpp.distributed.data_dependent_init`` does so under
``torch.compiler.set_stance("force_eager")``).
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Entries per shape class: train, eval under no_grad, and a few ragged batch sizes.
_ENTRIES_PER_CLASS = 6


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """The modules ``compile_model`` compiles, in model order."""
    from flowpp.layers.coupling import MixLogisticCoupling
    from flowpp.nets import ContextNet

    return [m for m in model.modules() if isinstance(m, (MixLogisticCoupling, ContextNet))]


def shape_class(module: nn.Module) -> tuple:
    """Two targets of one class see tensors of the same shapes (for a given batch)."""
    params = tuple(tuple(p.shape) for p in module.parameters())
    return (type(module).__name__, getattr(module, "split", None), params)


def shape_classes(model: nn.Module) -> int:
    return len({shape_class(m) for m in compile_targets(model)})


def compile_model(model: nn.Module, mode: str = "default", backend: str = "inductor") -> int:
    """Compile every target of ``model`` in place (``nn.Module.compile``); returns the shape classes.

    ``backend`` other than inductor (``aot_eager``, say) is for tests: it traces the same
    graphs, forward and backward, without generating kernels.
    """
    if mode not in MODES:
        raise ValueError(f"compile_mode={mode!r}: expected one of {MODES}")
    targets = compile_targets(model)
    classes = len({shape_class(m) for m in targets})
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _ENTRIES_PER_CLASS * classes)
    options = {"mode": mode} if backend == "inductor" else {}
    for module in targets:
        module.compile(dynamic=False, backend=backend, **options)
    return classes
