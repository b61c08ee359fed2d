"""A model's files (orchestrator.tracking.models): weights.safetensors and config.json are checked
against each other before a model is built, so a config.json from the artifact store cannot make
loading allocate what its weights do not hold, and an unknown key is one line."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch

from flowpp import build_model, get_preset
from orchestrator.core.errors import FlowppError
from orchestrator.tracking.models import build_from_files, save_model_files

pytestmark = pytest.mark.unit


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    return save_model_files(build_model(get_preset("debug")), tmp_path)


def test_the_files_load_back_to_the_same_model(files):
    weights, config = files
    model = build_from_files(weights, config)
    again = build_from_files(weights, config)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_a_config_asking_for_more_than_its_weights_hold_is_refused_before_anything_is_allocated(files):
    weights, config = files
    doc = json.loads(config.read_text())
    doc["net"]["hidden"] = 40_000  # about 1 TB of parameters, were it built
    config.write_text(json.dumps(doc))
    tracemalloc.start()
    with pytest.raises(FlowppError, match=r"weights.safetensors: its tensors do not fit config.json"):
        build_from_files(weights, config)
    assert tracemalloc.get_traced_memory()[1] < 100 * 2**20
    tracemalloc.stop()


def test_a_config_with_an_unknown_key_is_one_line_naming_the_file(files):
    weights, config = files
    doc = json.loads(config.read_text())
    doc["surprise"] = 1
    config.write_text(json.dumps(doc))
    with pytest.raises(FlowppError) as err:
        build_from_files(weights, config)
    text = str(err.value)
    assert text.startswith(f"{config}: not a model configuration this code reads") and "\n" not in text
