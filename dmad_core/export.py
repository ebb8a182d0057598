"""A fitted model's whole scorer as one torch module, for export to TorchScript or ONNX
(`dmad export`): an RGB image of any size in, the patch score grid, the image score and the
heat map out, with nothing of this project needed to run it.

Inside: the backbone and patch head, the feature standardisation, the normal bank as a constant matrix
searched exactly by matrix products within the image's class, and per class the defect classifier and the
two scales and weights of the classifier scorer (``DefectClassifierScorer.score``), the top-k image score
and the smoothed heat map (``modules.anomaly_maps``). Features are rounded through float16 as the feature
cache stores them, so scores equal the Python scorer's (tests/unit/test_export.py, 1e-4). The abnormal bank
is not needed: the classifier scorer reads the annotated defects through its classifiers.

Only the classifier scorer (the default) is exported; a model of the paper's mapper is refused. Classes are
numbered in ``ExportedScorer.categories`` order. The image is resized to the square input size inside
(antialiased bilinear, as ``FeatureExtractor.preprocess``): square images score as in Python; an image of
other proportions, which the Python scorer reads at its own aspect (``geometry="aspect"``), is squeezed.

Example::

    module = ExportedScorer.of(model)
    grid, score, heat = module(torch.from_numpy(rgb_uint8_hwc), torch.tensor(module.categories.index("bottle")))
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from dmad_core.backbone import IMAGENET_MEAN, IMAGENET_STD
from dmad_core.modules import smooth_maps


class ExportedScorer(nn.Module):
    """The classifier scorer of a fitted DMAD as a pure torch module (see the module docstring)."""

    body: nn.Module
    head: nn.Module
    # buffers, declared for the type checker (nn.Module.__getattr__ cannot say)
    mean: torch.Tensor
    std: torch.Tensor
    shift: torch.Tensor
    bank: torch.Tensor
    bank_norms: torch.Tensor
    row_mask: torch.Tensor
    coef: torch.Tensor
    intercept: torch.Tensor
    dist_median: torch.Tensor
    dist_span: torch.Tensor
    logit_median: torch.Tensor
    logit_span: torch.Tensor
    map_weight: torch.Tensor
    image_weight: torch.Tensor
    top_k: torch.Tensor

    def __init__(self, model) -> None:
        super().__init__()
        state = model.fitted()
        scorer = state.scorer
        if model.uses_mapper or scorer is None:
            raise ValueError("only the classifier scorer (the default) can be exported; this model scores with "
                             "the paper's mapper (`--scorer mapper`)")
        extractor = model.features.extractor
        self.body, self.head = extractor.eager_body().cpu().eval(), extractor.head.cpu().eval()
        self.categories = list(state.categories)
        cfg = model.config
        self.stride = cfg.backbone.stride
        self.input_size = (cfg.backbone.image_size, cfg.backbone.image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.from_numpy(np.asarray(state.scaling.shift, np.float32)))
        self.feature_scale = float(state.scaling.scale)
        bank = state.memory.normal_bank_.union_
        vectors = torch.from_numpy(np.asarray(bank.vectors, np.float32))
        self.register_buffer("bank", vectors)
        self.register_buffer("bank_norms", (vectors * vectors).sum(1))
        # +inf on the rows of other classes: a class's search sees its own rows only (class-aware bank)
        rows = np.asarray(bank.categories)
        self.register_buffer("row_mask", torch.from_numpy(np.stack(
            [np.where(rows == c, 0.0, np.inf) for c in self.categories]).astype(np.float32)))
        dim = vectors.shape[1]
        states = [scorer.classes_.get(c) or scorer._unknown_class() for c in self.categories]
        self.register_buffer("coef", torch.from_numpy(np.stack(
            [s.classifier.coef if s.classifier is not None else np.zeros(dim, np.float32) for s in states]).astype(np.float32)))

        def col(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32)

        self.register_buffer("intercept", col([s.classifier.intercept if s.classifier else 0.0 for s in states]))
        self.register_buffer("dist_median", col([s.distance_scale.median for s in states]))
        self.register_buffer("dist_span", col([max(s.distance_scale.q99 - s.distance_scale.median, 1e-6) for s in states]))
        self.register_buffer("logit_median", col([s.logit_scale.median if s.logit_scale else 0.0 for s in states]))
        self.register_buffer("logit_span", col([max(s.logit_scale.q99 - s.logit_scale.median, 1e-6) if s.logit_scale
                                                else 1.0 for s in states]))
        self.register_buffer("map_weight", col([s.map_weight if s.classifier else 0.0 for s in states]))
        self.register_buffer("image_weight", col([s.image_weight if s.classifier else 0.0 for s in states]))
        self.register_buffer("top_k", col([float(s.image_top_k or scorer.top_k) for s in states]))
        self.sigma = cfg.score.gaussian_sigma

    @staticmethod
    def of(model) -> ExportedScorer:
        return ExportedScorer(model).eval()

    def forward(self, image: torch.Tensor, category: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``image``: (H, W, 3) uint8 RGB of any size (resized here to the square input size, as
        ``FeatureExtractor.preprocess`` does); ``category``: the class's index (int64 scalar). Returns the patch
        grid (gh, gw), the image score () and the heat map at the input size (s, s)."""
        x = image.permute(2, 0, 1).unsqueeze(0).float() / 255.0
        x = functional.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        feats = self.head(self.body(x))[0]  # (gh, gw, C)
        gh, gw, dim = feats.shape[0], feats.shape[1], feats.shape[2]
        q = feats.reshape(-1, dim).half().float()  # as the feature cache stores them
        q = (q - self.shift) / self.feature_scale
        # the nearest row by |b|^2 - 2 q.b (within the class), then its distance computed directly, as
        # MemoryBank._exact_nearest does: the expanded form loses digits when a patch nearly matches
        ranking = self.bank_norms.unsqueeze(0) - 2.0 * q @ self.bank.T + self.row_mask[category].unsqueeze(0)
        nearest = self.bank[ranking.argmin(1)]
        dist = torch.sqrt(((q - nearest) ** 2).sum(1))
        z = (dist - self.dist_median[category]) / self.dist_span[category]
        logit = q @ self.coef[category] + self.intercept[category]
        logit = (logit - self.logit_median[category]) / self.logit_span[category]
        patch = z + self.map_weight[category] * logit
        per_image = z + self.image_weight[category] * logit
        ordered = torch.sort(per_image, descending=True).values
        k = torch.clamp(self.top_k[category], max=float(ordered.shape[0]))
        keep = (torch.arange(ordered.shape[0], dtype=torch.float32) < k).float()
        score = (ordered * keep).sum() / k
        grid = patch.reshape(gh, gw)
        return grid, score, self._heat(grid)

    def _heat(self, grid: torch.Tensor) -> torch.Tensor:
        """``modules.anomaly_maps`` at the input resolution: bilinear upsampling, then its Gaussian."""
        t = functional.interpolate(grid[None, None], scale_factor=float(self.stride), mode="bilinear",
                                   align_corners=False)
        return smooth_maps(t[:, 0], self.sigma)[0]
