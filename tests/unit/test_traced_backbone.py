"""The traced feature body (dmad_core/traced_backbone.py): kept once, loaded without timm, bit-identical to
timm's module on the images the product sees, refused where a trace would be wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from dmad_core import traced_backbone
from dmad_core.backbone import FeatureExtractor, weights_source
from dmad_core.config import BackboneConfig, DMADConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def weights_dir(tmp_path, monkeypatch) -> Path:
    """Traces go to a folder of this test's own (the offline preset's weights come from a package)."""
    monkeypatch.setenv("DMAD_WEIGHTS_DIR", str(tmp_path))
    return tmp_path / traced_backbone.TRACED_DIR_NAME


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (300, 200, 3), dtype=np.uint8), rng.integers(0, 256, (190, 512, 3), dtype=np.uint8)]


def test_the_trace_is_kept_loaded_and_gives_timm_s_features_bit_for_bit(weights_dir):
    config = DMADConfig.preset("offline").backbone
    first = FeatureExtractor(config, device="cpu")  # builds with timm, traces, keeps
    kept = list(weights_dir.glob("*.pt"))
    assert len(kept) == 1 and isinstance(first.body, torch.jit.ScriptModule)
    second = FeatureExtractor(config, device="cpu")  # loads the kept file
    assert isinstance(second.body, torch.jit.ScriptModule) and second.grid_size == first.grid_size == (32, 32)
    timm_body, stride = FeatureExtractor._build_body(config, allow_random_weights=False)
    assert stride == second.stride
    with torch.inference_mode():
        for image in _images():  # aspect geometry: sizes the trace never saw
            x = second.preprocess([image])
            for ours, timm_s in zip(second.backbone_forward(x), timm_body(x)):
                assert torch.equal(ours, timm_s)
            assert torch.equal(second(x), first(x))


def test_a_process_that_finds_the_trace_never_imports_timm(weights_dir):
    FeatureExtractor(DMADConfig.preset("offline").backbone, device="cpu")
    code = textwrap.dedent("""
        import sys, numpy as np
        from dmad_core.backbone import FeatureExtractor
        from dmad_core.config import DMADConfig
        fx = FeatureExtractor(DMADConfig.preset("offline").backbone, device="cpu")
        fx(fx.preprocess([np.zeros((64, 64, 3), np.uint8)]))
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision")))
    """)
    env = {**os.environ, "DMAD_WEIGHTS_DIR": str(weights_dir.parent), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_damaged_trace_is_ignored_and_written_again(weights_dir):
    config = DMADConfig.preset("offline").backbone
    FeatureExtractor(config, device="cpu")
    (path,) = weights_dir.glob("*.pt")
    path.write_bytes(path.read_bytes()[:1000])  # cut short, as a full disk would leave a file not renamed yet
    assert traced_backbone.load_traced(path) is None
    again = FeatureExtractor(config, device="cpu")
    assert isinstance(again.body, torch.jit.ScriptModule) and traced_backbone.load_traced(path) is not None


class _SizeDependentPadding(nn.Module):
    """Pads by an amount computed in Python from the input's width, as timm's ``tf_`` models do: a trace
    bakes in the traced size's padding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pad = int(x.shape[-1]) % 7
        return [self.conv(functional.pad(x, (pad, pad, pad, pad)))]


def test_a_network_whose_trace_depends_on_the_input_size_is_not_kept(tmp_path):
    config = BackboneConfig(name="toy", layers=(2, 3), image_size=64)
    path = tmp_path / "toy.pt"
    assert traced_backbone.trace_and_keep(_SizeDependentPadding().eval(), 8, config, path) is None
    assert not path.exists()


def test_random_weights_are_never_traced_and_old_traces_are_pruned(tmp_path):
    config = BackboneConfig(name="efficientnet_lite0", weights="random")
    assert weights_source(config) == "random" and traced_backbone.traced_path(config, "random") is None
    for i in range(traced_backbone.MAX_KEPT + 3):
        f = tmp_path / f"t{i}.pt"
        f.write_bytes(b"x")
        os.utime(f, (1000 + i, 1000 + i))
    deleted = traced_backbone.prune(tmp_path)
    assert sorted(p.name for p in deleted) == ["t0.pt", "t1.pt", "t2.pt"]
    assert len(list(tmp_path.glob("*.pt"))) == traced_backbone.MAX_KEPT
