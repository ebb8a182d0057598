"""The trainable parts of DMAD as plain torch modules: knowledge enhancement, projection, score mapper, loss.

Shapes: an image contributes N patch features q (N, C); for each bank the nearest neighbour nn (N, C).
Knowledge for one bank: ``k = (q - nn) + attention(query=nn, key/value = linear maps of the image's q)``
(the attention term is switched off in ``distance`` mode). Projection P is one linear layer; the enhanced
representation is ``o = [P(q), P(k_n), P(k_a)]`` (3C). The mapper Psi maps o to a scalar; the anomaly
score is ``-Psi(o)`` (training pushes normal patches to +margin).

Two optional additions (``docs/method-notes.md`` says why and what they measured), both off by default at
module level and on in the presets:

- ``distance_features``: o also carries the two nearest-neighbour distances ``|q - nn_n|``, ``|q - nn_a|``,
  standardised by their distribution over normal training patches (``DistanceScaler``), so the mapper
  does not have to rebuild a Euclidean norm from 2C linear projections;
- ``distance_prior``: ``Psi(o) = margin * (1 - z_n) + MLP(o)`` where ``z_n`` is the normal-bank distance
  scaled so that the median normal training patch has z 0 and the 99th percentile z 1. With the MLP's
  head initialised at zero the untrained model *is* the kNN baseline (a monotone map of its distance);
  training learns a correction on top of it instead of rediscovering the distance from scratch.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
from torch.nn import functional
from torch import nn


def pool_patch_grid(feats: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, N, C) patches of a square grid -> (B, N / factor^2, C), average-pooled; unchanged when the grid
    is not square or not divisible by ``factor``."""
    if factor <= 1:
        return feats
    b, n, c = feats.shape
    g = math.isqrt(n)
    if g * g != n or g % factor:
        return feats
    x = feats.transpose(1, 2).reshape(b, c, g, g)
    return functional.avg_pool2d(x, factor).reshape(b, c, -1).transpose(1, 2)


class BankAttention(nn.Module):
    """Cross-attention from a patch's bank neighbour to all patches of its own image."""

    def __init__(self, dim: int, attention_dim: int, key_pool: int = 1):
        super().__init__()
        self.key_pool = key_pool
        self.to_query = nn.Linear(dim, attention_dim)
        self.to_key = nn.Linear(dim, attention_dim)
        self.to_value = nn.Linear(dim, dim)

    def forward(self, nn_feats: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
        """nn_feats (B, P, C) for P selected patches; image_feats (B, N, C), all patches of each image."""
        q = self.to_query(nn_feats)
        image_feats = pool_patch_grid(image_feats, self.key_pool)
        k = self.to_key(image_feats)
        v = self.to_value(image_feats)
        return functional.scaled_dot_product_attention(q, k, v)


class DistanceScaler(nn.Module):
    """Standardises the (normal, abnormal) nearest-neighbour distances: ``z = (d - centre) / scale``.

    Fitted once on normal training patches (``fit``): centre = median, scale = 99th percentile - median. The
    statistics are buffers, so they are saved and loaded with the weights.
    """

    centre: torch.Tensor  # buffers, declared for the type checker (nn.Module.__getattr__ cannot say)
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(2))
        self.register_buffer("scale", torch.ones(2))

    @torch.no_grad()
    def fit(self, distances: torch.Tensor) -> None:
        """distances (M, 2): normal-bank and abnormal-bank distances of normal training patches."""
        d = distances.float()
        med = d.median(dim=0).values
        q99 = torch.quantile(d, 0.99, dim=0)
        self.centre.copy_(med)
        self.scale.copy_(torch.clamp(q99 - med, min=1e-6))

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return (d - self.centre) / self.scale


class KnowledgeEnhancer(nn.Module):
    """Builds o = [P(q), P(k_n), P(k_a)] (and optionally the two scaled distances) from patch features and
    their neighbours in both banks."""

    def __init__(self, dim: int, attention_dim: int, use_attention: bool, distance_features: bool = False,
                 key_pool: int = 1):
        super().__init__()
        self.use_attention = use_attention
        self.distance_features = distance_features
        self.attention_normal = BankAttention(dim, attention_dim, key_pool)
        self.attention_abnormal = BankAttention(dim, attention_dim, key_pool)
        self.projection = nn.Linear(dim, dim)
        self.distances = DistanceScaler()

    @property
    def out_dim_extra(self) -> int:
        return 2 if self.distance_features else 0

    def scaled_distances(self, q: torch.Tensor, nn_normal: torch.Tensor, nn_abnormal: torch.Tensor) -> torch.Tensor:
        """(..., 2): standardised ``|q - nn_n|`` and ``|q - nn_a|``."""
        d = torch.stack([(q - nn_normal).norm(dim=-1), (q - nn_abnormal).norm(dim=-1)], dim=-1)
        return self.distances(d)

    def knowledge(self, q: torch.Tensor, nn_normal: torch.Tensor, nn_abnormal: torch.Tensor,
                  image_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_n, k_a) before the projection."""
        k_n = q - nn_normal
        k_a = q - nn_abnormal
        if self.use_attention:
            k_n = k_n + self.attention_normal(nn_normal, image_feats)
            k_a = k_a + self.attention_abnormal(nn_abnormal, image_feats)
        return k_n, k_a

    def unprojected(self, q, nn_normal, nn_abnormal, image_feats) -> torch.Tensor:
        """``[q, k_n, k_a]`` (and the distances): o before P; see ``DMADNet.folded_input_layer``."""
        parts = [q, *self.knowledge(q, nn_normal, nn_abnormal, image_feats)]
        if self.distance_features:
            parts.append(self.scaled_distances(q, nn_normal, nn_abnormal))
        return torch.cat(parts, dim=-1)

    def forward(
        self,
        q: torch.Tensor,  # (B, P, C) the patches to represent
        nn_normal: torch.Tensor,  # (B, P, C)
        nn_abnormal: torch.Tensor,  # (B, P, C)
        image_feats: torch.Tensor,  # (B, N, C) all patches of the same images (keys/values of attention)
    ) -> torch.Tensor:
        k_n, k_a = self.knowledge(q, nn_normal, nn_abnormal, image_feats)
        parts = [self.projection(q), self.projection(k_n), self.projection(k_a)]
        if self.distance_features:
            parts.append(self.scaled_distances(q, nn_normal, nn_abnormal))
        return torch.cat(parts, dim=-1)


class ScoreMapper(nn.Module):
    """MLP of ``n_layers`` (linear + batch norm + leaky ReLU) with skip connections, then a scalar head."""

    def __init__(self, in_dim: int, hidden_dim: int, n_layers: int = 4, zero_head: bool = False):
        super().__init__()
        self.input = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.LeakyReLU(0.2))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.LeakyReLU(0.2))
            for _ in range(max(n_layers - 1, 0))
        )
        self.head = nn.Linear(hidden_dim, 1)
        if zero_head:  # the mapper starts as "no correction" (used with the distance prior)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, o: torch.Tensor, input_layer: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``input_layer`` (weight, bias): replaces the first linear layer (the folded one at inference)."""
        shape = o.shape[:-1]
        x = o.reshape(-1, o.shape[-1])
        if input_layer is None:
            x = self.input(x)
        else:
            x = self.input[1:](functional.linear(x, *input_layer))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).reshape(shape)


class DMADNet(nn.Module):
    """Enhancer + mapper together, so one state dict holds everything trained (distance statistics too)."""

    def __init__(self, dim: int, attention_dim: int, hidden_dim: int, n_layers: int, use_attention: bool,
                 distance_features: bool = False, distance_prior: bool = False, margin: float = 0.5,
                 correction_bound: float = 0.0, key_pool: int = 1):
        super().__init__()
        self.correction_bound = correction_bound
        self.enhancer = KnowledgeEnhancer(dim, attention_dim, use_attention, distance_features, key_pool)
        self.mapper = ScoreMapper(3 * dim + self.enhancer.out_dim_extra, hidden_dim, n_layers, zero_head=distance_prior)
        self.distance_prior = distance_prior
        self.margin = margin

    def represent(self, q, nn_normal, nn_abnormal, image_feats) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(o, prior): the enhanced representation (B, P, D) and the distance prior (B, P) or None."""
        return self.enhancer(q, nn_normal, nn_abnormal, image_feats), self._prior(q, nn_normal, nn_abnormal)

    def _prior(self, q, nn_normal, nn_abnormal) -> torch.Tensor | None:
        if not self.distance_prior:
            return None
        z_n = self.enhancer.scaled_distances(q, nn_normal, nn_abnormal)[..., 0]
        return self.margin * (1.0 - z_n)

    def folded_input_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mapper's first linear layer composed with the projection P, as one linear map of
        ``[q, k_n, k_a, distances]``: ``W [Pq + b, Pk_n + b, Pk_a + b] = [W_1 P, W_2 P, W_3 P] [q, k_n, k_a] +
        (W_1 + W_2 + W_3) b``. Exact, and 3 C x C multiply-adds cheaper per patch (C = 1536 on the paper
        preset: almost half of the whole net's work)."""
        first = cast(nn.Linear, self.mapper.input[0])
        weight, bias = first.weight, first.bias
        proj = self.enhancer.projection
        c = proj.in_features
        blocks = [weight[:, i * c:(i + 1) * c] for i in range(3)]
        folded = torch.cat([b @ proj.weight for b in blocks] + [weight[:, 3 * c:]], dim=1)
        return folded, bias + sum(b @ proj.bias for b in blocks)

    def head(self, o: torch.Tensor, prior: torch.Tensor | None,
             input_layer: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Mapper output for representations (and priors) already selected, e.g. the valid patches only;
        ``input_layer``: see ``ScoreMapper.forward``."""
        out = self.mapper(o, input_layer)
        if prior is None:
            return out
        if self.correction_bound > 0:  # a bounded correction: the mapper refines the kNN score, within limits
            out = self.correction_bound * torch.tanh(out / self.correction_bound)
        return out + prior

    def forward(self, q, nn_normal, nn_abnormal, image_feats) -> torch.Tensor:
        """Mapper output per patch (B, P); the anomaly score is its negation. In eval mode (inference) the
        projection is folded into the mapper's first layer (same output, less work)."""
        if self.training:
            return self.head(*self.represent(q, nn_normal, nn_abnormal, image_feats))
        o = self.enhancer.unprojected(q, nn_normal, nn_abnormal, image_feats)
        return self.head(o, self._prior(q, nn_normal, nn_abnormal), self.folded_input_layer())


def hinge_loss(
    out_normal: torch.Tensor,
    out_pseudo: torch.Tensor,
    out_annotated: torch.Tensor | None,
    margin: float,
    lambda_pseudo: float,
    lambda_annotated: float,
) -> torch.Tensor:
    """``max(0, m - Psi(o_n)) + l1 max(0, m + Psi(o_pseudo)) + l2 max(0, m + Psi(o_annotated))``, each a mean."""
    loss = functional.relu(margin - out_normal).mean() + lambda_pseudo * functional.relu(margin + out_pseudo).mean()
    if out_annotated is not None and out_annotated.numel() and lambda_annotated:
        loss = loss + lambda_annotated * functional.relu(margin + out_annotated).mean()
    return loss


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def smooth_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, reflect-padded (like scipy's default); a map smaller than
    the kernel's radius is edge-padded instead (reflection needs the radius inside the map)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma).to(maps)
    r = (len(k) - 1) // 2
    x = maps.unsqueeze(1)
    mode_w = "reflect" if x.shape[-1] > r else "replicate"
    mode_h = "reflect" if x.shape[-2] > r else "replicate"
    x = functional.conv2d(functional.pad(x, (r, r, 0, 0), mode=mode_w), k.view(1, 1, 1, -1))
    x = functional.conv2d(functional.pad(x, (0, 0, r, r), mode=mode_h), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def anomaly_maps(grids: np.ndarray, size: tuple[int, int] | None, sigma: float, stride: int) -> np.ndarray:
    """(B, gh, gw) patch score grids -> (B, H, W) pixel maps: upsampled bilinearly to the model's input
    resolution (``stride`` input pixels a cell: gh x stride, gw x stride, where ``sigma`` is defined),
    Gaussian-smoothed there, then resized to ``size`` (None: stay at the input resolution).
    Use ``DMAD.anomaly_map``, which passes the model's own sigma and stride."""
    t = torch.from_numpy(np.asarray(grids, np.float32)).unsqueeze(1)
    base = (t.shape[-2] * stride, t.shape[-1] * stride)
    t = functional.interpolate(t, size=base, mode="bilinear", align_corners=False).squeeze(1)
    t = smooth_maps(t, sigma)
    if size is not None and tuple(size) != base:
        t = functional.interpolate(t.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    return t.numpy()
