import pytest
import torch

from flowpp import PRESETS, FlowConfig, FlowPlusPlus, build_model, get_preset
from flowpp.distributed import data_dependent_init
from flowpp.presets import OFFICIAL_PARAM_COUNTS
from tests.helpers import random_images


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_parameter_counts_within_two_percent_of_official(name):
    with torch.device("meta"):  # no memory, no init: just shapes
        n = sum(p.numel() for p in FlowPlusPlus(get_preset(name)).parameters())
    official = OFFICIAL_PARAM_COUNTS[name]
    assert abs(n - official) <= 0.02 * official, (n, official)


@pytest.mark.slow
@pytest.mark.unit
def test_exact_counts_where_the_official_code_has_no_dead_variables():
    # CIFAR-10 and ImageNet 32x32 match to the parameter. The official ImageNet 64x64
    # dequantizer creates a position embedding it never uses (4 x 64 x 32 x 96).
    for name in ("cifar10", "imagenet32"):
        with torch.device("meta"):
            n = sum(p.numel() for p in FlowPlusPlus(get_preset(name)).parameters())
        assert n == OFFICIAL_PARAM_COUNTS[name]
    with torch.device("meta"):
        n = sum(p.numel() for p in FlowPlusPlus(get_preset("imagenet64")).parameters())
    assert OFFICIAL_PARAM_COUNTS["imagenet64"] - n == 4 * 64 * 32 * 96


@pytest.mark.unit
def test_config_round_trips_through_a_dict():
    for name in PRESETS:
        cfg = get_preset(name)
        assert FlowConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.unit
def test_unknown_preset_and_bad_stage_are_named():
    with pytest.raises(KeyError, match="nope"):
        get_preset("nope")
    with pytest.raises(ValueError, match="diagonal:2"):
        FlowPlusPlus(get_preset("debug").replace(stages=("diagonal:2",)))


def _forward_backward_sample(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    x = random_images(1, cfg.image_size, cfg.num_levels)
    data_dependent_init(model, x)
    loss = model.bits_per_dim(x).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    samples = model.eval().sample(1)
    assert samples.shape == (1, *cfg.shape) and samples.dtype == torch.uint8


@pytest.mark.unit
def test_debug_preset_forward_backward_sample():
    _forward_backward_sample(get_preset("debug"))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("name", ["cifar10", "imagenet32", "imagenet64", "imagenet64_5bit"])
def test_full_preset_forward_backward_sample(name):
    _forward_backward_sample(get_preset(name, checkpoint="attention"))
