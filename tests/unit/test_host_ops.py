"""bench/host_ops.py --against REV runs this checkout's script on REV's library code: it takes
train_step (and ddp_options) from whichever layout REV has, orchestrator/training/step.py since
issue 27, orchestrator/step.py before it."""

from __future__ import annotations

import sys

import pytest

from bench import host_ops

pytestmark = pytest.mark.unit


@pytest.fixture
def layouts(tmp_path, monkeypatch):
    """Packages on sys.path with a step module in the old layout, and one whose step module fails
    inside; the modules they add are dropped again afterwards."""
    old, broken = tmp_path / "h25_old", tmp_path / "h25_broken"
    for package in (old, broken):
        package.mkdir()
        (package / "__init__.py").write_text("")
    (old / "step.py").write_text("def train_step(model, opt, x, *, lr, grad_clip):\n    return 'old'\n")
    (broken / "step.py").write_text("import h25_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("h25_old", "h25_broken", "h25_new")):
            del sys.modules[name]


def test_the_step_module_is_taken_from_the_new_layout_else_the_old(layouts):
    module = host_ops.step_module(("h25_new.training.step", "h25_old.step"))  # a commit before issue 27's split
    assert module.__name__ == "h25_old.step" and module.train_step(None, None, None, lr=0, grad_clip=0) == "old"
    assert not hasattr(module, "ddp_options")  # then _ddp wraps with DDP's defaults, as the trainer did
    here = host_ops.step_module()  # this checkout: issue 27's layout, with issue 25's DDP options
    assert here.__name__ == "orchestrator.training.step" and callable(here.ddp_options)


def test_a_step_module_that_fails_inside_is_an_error_not_a_fallback(layouts):
    with pytest.raises(ModuleNotFoundError, match="h25_no_such_dependency"):
        host_ops.step_module(("h25_broken.step", "h25_old.step"))
    with pytest.raises(ModuleNotFoundError, match="none of h25_new.step, h25_new.training.step"):
        host_ops.step_module(("h25_new.step", "h25_new.training.step"))
