"""model.compile: the couplings trace without graph breaks, each shape class compiles once,
and the compiled step gives eager's loss and gradients.

The unit tests trace through ``aot_eager`` (dynamo and AOT autograd, the same graphs inductor
gets, without kernel generation, so seconds instead of minutes);
tests/integration/test_compile_inductor.py checks the generated kernels' numerics.
"""

import pytest
import torch

from flowpp import build_model
from flowpp.compile import MODES, compile_model, compile_targets, shape_classes
from flowpp.distributed import data_dependent_init
from orchestrator.config import ModelSpec
from tests.helpers import random_images, tiny_config

pytestmark = pytest.mark.unit


def _pair(backend, image_size=8, **overrides):
    """An eager model and a compiled twin with the same initialised weights, and a batch."""
    cfg = tiny_config(image_size=image_size, checkpoint="attention", **overrides)
    x = random_images(4, image_size, cfg.num_levels, seed=1)
    torch.manual_seed(0)
    eager = build_model(cfg)
    data_dependent_init(eager, x)
    twin = build_model(cfg)
    twin.load_state_dict(eager.state_dict())
    classes = compile_model(twin, backend=backend)
    return eager, twin, x, classes


def _loss_and_grads(model, x, seed=3):
    torch.manual_seed(seed)  # the same dequantization noise for both models
    model.zero_grad(set_to_none=True)
    loss = model.bits_per_dim(x).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_shape_classes_of_the_debug_model():
    model = build_model(tiny_config(image_size=8))
    # main flow: stripe at 8x8, channel and stripe after s2d; dequantizer: stripe with context; context net
    assert len(compile_targets(model)) == 2 + 2 + 2 + 2 + 1
    assert shape_classes(model) == 5


@pytest.mark.slow
def test_no_graph_breaks_and_one_compile_per_shape_class(fresh_dynamo):
    eager, twin, x, classes = _pair("aot_eager")
    twin.train()
    _loss_and_grads(twin, x)
    assert dict(fresh_dynamo["graph_break"]) == {}
    assert fresh_dynamo["stats"]["unique_graphs"] == classes == 5
    for seed in (4, 5):  # later steps, through every coupling again: nothing recompiles
        _loss_and_grads(twin, x, seed)
    assert fresh_dynamo["stats"]["unique_graphs"] == classes
    assert dict(fresh_dynamo["graph_break"]) == {}


@pytest.mark.slow
def test_compiled_loss_and_gradients_match_eager(fresh_dynamo):
    eager, twin, x, _ = _pair("aot_eager")
    loss_e, grads_e = _loss_and_grads(eager, x)
    loss_c, grads_c = _loss_and_grads(twin, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_init_runs_eagerly_even_when_compiled(fresh_dynamo):
    cfg = tiny_config(image_size=8, compile=True)
    model = build_model(cfg)
    data_dependent_init(model, random_images(4, 8, cfg.num_levels))
    assert fresh_dynamo["stats"]["unique_graphs"] == 0  # nothing traced during the init
    assert all(bool(b) for name, b in model.named_buffers() if name.endswith("initialized"))


def test_bad_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile_mode='fast'"):
        compile_model(build_model(tiny_config()), mode="fast")
    with pytest.raises(ValueError, match="compile_mode"):
        ModelSpec(compile=True, compile_mode="fast")
    assert ModelSpec(compile=True, compile_mode=MODES[1]).flow_config().compile_mode == "reduce-overhead"


def test_channels_last_gives_the_same_loss():
    cfg = tiny_config(image_size=8)
    x = random_images(4, 8, cfg.num_levels, seed=1)
    torch.manual_seed(0)
    plain = build_model(cfg)
    data_dependent_init(plain, x)
    cl = build_model(cfg.replace(channels_last=True))
    cl.load_state_dict(plain.state_dict())
    conv = next(m for m in cl.modules() if type(m).__name__ == "Conv2d" and m.weight.shape[-1] == 3)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    loss_p, grads_p = _loss_and_grads(plain, x)
    loss_c, grads_c = _loss_and_grads(cl, x)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-5, atol=1e-5)
    for k in grads_p:
        torch.testing.assert_close(grads_c[k], grads_p[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_job_spec_options_reach_the_model_and_the_optimizer():
    from pathlib import Path

    from orchestrator.config import load_job
    from orchestrator.training.loop import _adam
    from orchestrator.training.step import train_step

    spec = load_job(Path(__file__).resolve().parents[2] / "jobs" / "imagenet64.yaml")
    assert spec.train.fused_adam and not spec.model.compile
    spec.model.compile, spec.model.channels_last = True, True
    cfg = spec.model.flow_config()
    assert (cfg.compile, cfg.compile_mode, cfg.channels_last) == (True, "default", True)
    assert cfg.for_inference().compile is False
    model = build_model(tiny_config(image_size=8))
    data_dependent_init(model, random_images(4, 8))
    opt = _adam(model, spec)
    assert opt.defaults["fused"] is True
    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(model, opt, random_images(4, 8), lr=1e-4, grad_clip=1.0)
    assert not result.skipped
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
