"""The patch head's border (``BackboneConfig.border``): "zeros" averages the padding in at the image's edge
(PatchCore's), "image" the image's own cells only; a model saved before the setting keeps the features it
was fitted on, and each border has its own feature-cache key."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from dmad_core.backbone import PatchFeatureHead
from dmad_core.config import BackboneConfig, DMADConfig


def test_zero_padding_darkens_the_border_cells_only():
    ones = [torch.ones(1, 2, 6, 6)]
    image = PatchFeatureHead(feature_dim=2, border="image")(ones)[0, ..., 0]
    zeros = PatchFeatureHead(feature_dim=2, border="zeros")(ones)[0, ..., 0]
    assert torch.allclose(image, torch.ones(6, 6))
    assert torch.allclose(zeros[1:-1, 1:-1], torch.ones(4, 4))  # inner cells: the same average
    assert zeros[0, 0] == pytest.approx(4 / 9) and zeros[0, 3] == pytest.approx(6 / 9)


def test_an_unknown_border_is_refused():
    with pytest.raises(ValueError, match="zeros"):
        PatchFeatureHead(feature_dim=2, border="reflect")


def test_each_border_has_its_own_cache_key_and_image_keeps_the_old_one():
    zeros, image = BackboneConfig(), BackboneConfig(border="image")
    assert zeros.border == "zeros" and zeros.cache_key() != image.cache_key()
    # the key of a configuration from before the field: its payload had no "border"
    payload = {k: v for k, v in dataclasses.asdict(image).items() if k not in ("weights", "border", "resnet_v1_strides",
                                                                              "geometry", "max_aspect")}
    assert image.cache_key() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def test_a_configuration_saved_without_a_border_reads_as_image():
    saved = DMADConfig.preset("offline").to_dict()
    del saved["backbone"]["border"]
    assert DMADConfig.from_dict(saved).backbone.border == "image"
    assert DMADConfig.from_dict(DMADConfig.preset("offline").to_dict()).backbone.border == "zeros"
