"""The distance features, the distance prior and the bounded correction of the mapper (modules only: fast)."""

from __future__ import annotations

import torch

from dmad_core.modules import DMADNet, DistanceScaler


def _net(**kw) -> DMADNet:
    torch.manual_seed(0)
    return DMADNet(4, 2, 8, 4, True, distance_features=True, distance_prior=True, **kw)


def test_distance_scaler_median_zero_q99_one():
    s = DistanceScaler()
    d = torch.stack([torch.arange(101.0), 2 * torch.arange(101.0)], dim=1)
    s.fit(d)
    z = s(torch.tensor([[50.0, 100.0], [99.0, 198.0]]))
    assert torch.allclose(z, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), atol=1e-5)
    assert set(dict(s.named_buffers())) == {"centre", "scale"}  # saved with the weights


def test_untrained_net_with_prior_is_the_knn_score():
    net = _net().eval()
    q = torch.randn(1, 6, 4)
    nn_n = q + torch.linspace(0.1, 3.0, 6)[None, :, None]  # distance grows along the patches
    scores = -net(q, nn_n, torch.randn(1, 6, 4), q)
    assert torch.all(scores[0, 1:] > scores[0, :-1])  # zero-initialised head: a monotone map of |q - nn_n|
    o, _ = net.represent(q, nn_n, nn_n, q)
    assert o.shape == (1, 6, 3 * 4 + 2)


def test_correction_is_bounded():
    net = _net(correction_bound=0.5).eval()
    torch.nn.init.constant_(net.mapper.head.bias, 100.0)  # a huge correction...
    q = torch.randn(1, 3, 4)
    out, prior = net(q, q + 1, q - 1, q), net.represent(q, q + 1, q - 1, q)[1]
    assert torch.all((out - prior).abs() <= 0.5 + 1e-6)  # ...is capped at the bound
