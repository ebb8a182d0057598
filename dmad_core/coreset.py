"""Approximate greedy coreset (k-center) selection, as in PatchCore.

Distances are computed on a fixed random projection of the features (cheap, and distances are approximately
preserved), and the greedy loop keeps, for every point, its distance to the nearest selected centre.
"""

from __future__ import annotations

import numpy as np
import torch


def _project(features: np.ndarray, dim: int, seed: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if dim and x.shape[1] > dim:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(x.shape[1], dim, generator=g) / np.sqrt(dim)
        x = x @ w
    return x


def greedy_coreset(
    features: np.ndarray,
    n_select: int,
    projection_dim: int = 128,
    seed: int = 0,
    initial: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of ``n_select`` points chosen by farthest-point (k-center) greedy selection.

    ``initial``: features of centres that already exist (e.g. the current bank when new normal images are
    added); the selection then continues from them instead of starting from a random point.
    """
    n = len(features)
    n_select = int(min(max(n_select, 1), n))
    x = _project(features, projection_dim, seed)
    if initial is not None and len(initial):
        c = _project(initial, projection_dim, seed)
        min_d = torch.cdist(x, c).min(dim=1).values
        first = int(torch.argmax(min_d))
    else:
        min_d = torch.full((n,), float("inf"))
        first = int(np.random.default_rng(seed).integers(n))
    selected = np.empty(n_select, dtype=np.int64)
    idx = first
    for i in range(n_select):
        selected[i] = idx
        d = torch.linalg.vector_norm(x - x[idx], dim=1)
        min_d = torch.minimum(min_d, d)
        idx = int(torch.argmax(min_d))
    return selected


def coreset_size(n_points: int, ratio: float, minimum: int = 1) -> int:
    return int(min(n_points, max(minimum, round(n_points * ratio))))
