import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


from tests.s3fixtures import aws_env, s3, s3_endpoint  # noqa: E402,F401  (fixtures)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after; yields dynamo's counters (graphs, breaks)."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.fixture
def root():
    """The root logger, its handlers and level restored afterwards (pytest adds its own during a test)."""
    import logging

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield root
    root.handlers, root.level = saved, level
