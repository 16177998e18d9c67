import pytest
import torch

from eval.conv_peers import peer_pair, time_layers


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel_size", [1, 3, 4, 7])
def test_same_output_and_gradients_as_fairseq(kernel_size, causal):
    torch.manual_seed(0)
    ours, theirs = peer_pair(16, kernel_size, 4, causal)
    x = torch.randn(9, 3, 16, requires_grad=True)
    y_ours = ours(x)
    grad_ours, = torch.autograd.grad(y_ours.pow(2).sum(), x)
    y_theirs = theirs(x)
    grad_theirs, = torch.autograd.grad(y_theirs.pow(2).sum(), x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-5, rtol=1e-5)


def test_time_layers_gives_both_timings_per_shape():
    rows = time_layers([(5, 2, 3, True), (4, 3, 7, False)], repeat=1)
    assert [(r["length"], r["kernel_size"]) for r in rows] == [(5, 3), (4, 7)]
    assert all(r["lite_ms"] > 0 and r["fairseq_ms"] > 0 for r in rows)
