"""model.compile with inductor: the generated kernels give eager's loss and gradients.

A minute or two of kernel generation on CPU, hence the integration tier.
"""

import pytest
import torch

from tests.unit.test_compile import _loss_and_grads, _pair

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_inductor_kernels_match_eager(fresh_dynamo):
    """The generated kernels (fused mixture maths, convolutions) within float32 tolerance."""
    eager, twin, x, classes = _pair("inductor", image_size=8)
    loss_e, grads_e = _loss_and_grads(eager, x)
    loss_c, grads_c = _loss_and_grads(twin, x)
    assert dict(fresh_dynamo["graph_break"]) == {}
    assert fresh_dynamo["stats"]["unique_graphs"] == classes
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k], rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
