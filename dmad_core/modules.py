"""The trainable parts of DMAD as plain torch modules: knowledge enhancement, projection, score mapper, loss.

Shapes: an image contributes N patch features q (N, C); for each bank the nearest neighbour nn (N, C).
Knowledge for one bank: ``k = (q - nn) + attention(query=nn, key/value = linear maps of the image's q)``
(the attention term is switched off in ``distance`` mode). Projection P is one linear layer; the enhanced
representation is ``o = [P(q), P(k_n), P(k_a)]`` (3C). The mapper Psi maps o to a scalar; the anomaly
score is ``-Psi(o)`` (training pushes normal patches to +margin).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BankAttention(nn.Module):
    """Cross-attention from a patch's bank neighbour to all patches of its own image."""

    def __init__(self, dim: int, attention_dim: int):
        super().__init__()
        self.to_query = nn.Linear(dim, attention_dim)
        self.to_key = nn.Linear(dim, attention_dim)
        self.to_value = nn.Linear(dim, dim)

    def forward(self, nn_feats: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
        """nn_feats (B, P, C) for P selected patches; image_feats (B, N, C), all patches of each image."""
        q = self.to_query(nn_feats)
        k = self.to_key(image_feats)
        v = self.to_value(image_feats)
        return F.scaled_dot_product_attention(q, k, v)


class KnowledgeEnhancer(nn.Module):
    """Builds o = [P(q), P(k_n), P(k_a)] from patch features and their neighbours in both banks."""

    def __init__(self, dim: int, attention_dim: int, use_attention: bool):
        super().__init__()
        self.use_attention = use_attention
        self.attention_normal = BankAttention(dim, attention_dim)
        self.attention_abnormal = BankAttention(dim, attention_dim)
        self.projection = nn.Linear(dim, dim)

    def forward(
        self,
        q: torch.Tensor,  # (B, P, C) the patches to represent
        nn_normal: torch.Tensor,  # (B, P, C)
        nn_abnormal: torch.Tensor,  # (B, P, C)
        image_feats: torch.Tensor,  # (B, N, C) all patches of the same images (keys/values of attention)
    ) -> torch.Tensor:
        k_n = q - nn_normal
        k_a = q - nn_abnormal
        if self.use_attention:
            k_n = k_n + self.attention_normal(nn_normal, image_feats)
            k_a = k_a + self.attention_abnormal(nn_abnormal, image_feats)
        return torch.cat([self.projection(q), self.projection(k_n), self.projection(k_a)], dim=-1)


class ScoreMapper(nn.Module):
    """MLP of ``n_layers`` (linear + batch norm + leaky ReLU) with skip connections, then a scalar head."""

    def __init__(self, in_dim: int, hidden_dim: int, n_layers: int = 4):
        super().__init__()
        self.input = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.LeakyReLU(0.2))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.LeakyReLU(0.2))
            for _ in range(max(n_layers - 1, 0))
        )
        self.head = nn.Linear(hidden_dim, 1)

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        shape = o.shape[:-1]
        x = self.input(o.reshape(-1, o.shape[-1]))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).reshape(shape)


class DMADNet(nn.Module):
    """Enhancer + mapper together, so one state dict holds everything trained."""

    def __init__(self, dim: int, attention_dim: int, hidden_dim: int, n_layers: int, use_attention: bool):
        super().__init__()
        self.enhancer = KnowledgeEnhancer(dim, attention_dim, use_attention)
        self.mapper = ScoreMapper(3 * dim, hidden_dim, n_layers)

    def forward(self, q, nn_normal, nn_abnormal, image_feats) -> torch.Tensor:
        """Mapper output per patch (B, P); the anomaly score is its negation."""
        return self.mapper(self.enhancer(q, nn_normal, nn_abnormal, image_feats))


def hinge_loss(
    out_normal: torch.Tensor,
    out_pseudo: torch.Tensor,
    out_annotated: torch.Tensor | None,
    margin: float,
    lambda_pseudo: float,
    lambda_annotated: float,
) -> torch.Tensor:
    """``max(0, m - Psi(o_n)) + l1 max(0, m + Psi(o_pseudo)) + l2 max(0, m + Psi(o_annotated))``, each a mean."""
    loss = F.relu(margin - out_normal).mean() + lambda_pseudo * F.relu(margin + out_pseudo).mean()
    if out_annotated is not None and out_annotated.numel() and lambda_annotated:
        loss = loss + lambda_annotated * F.relu(margin + out_annotated).mean()
    return loss


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def smooth_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, reflect-padded (like scipy's default)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma).to(maps)
    r = (len(k) - 1) // 2
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1)
