"""Which scoring makes a few masked defects beat the kNN (PatchCore) baseline, in one unified model?
(issue 12, items 2-4: the measurement side). Nothing here is used by the product.

    .venv/bin/python benchmarks/supervision_study.py [--backbone offline|resnet50] [--geometry square|aspect]
        [--seeds 0 1 2] [--k 1 5 10] [--alone] [--cache /tmp/research-cache] [--json OUT.json]

What it does, per seed (everything on cached patch features; the backbone runs once per image and geometry):

1. Reads the classes (default: tire, bottle, KolektorSDD commutator from ../shared/data), carves a
   validation split (10 % of each class's train/good, seeded, as the product does) and builds ONE normal
   bank from the rest: greedy coreset 2 % over all classes' patches (100k candidates), searched
   class-aware (a patch is compared with its own class's entries only), exactly.
2. Unsupervised: kNN distance per patch (d_n); image score = max (PatchCore) and top-5 mean (paper).
3. Semi-supervised, K = 1, 5, 10 masked defects per class drawn as ``dmad eval`` draws them (seeded, removed
   from evaluation). The annotated patches (mask coverage >= 0.5 of a patch, or, for a defect thinner than
   half a patch, at least half the best-covered patch's coverage) form the seen set, shared by all classes.
   Rules, each with its one parameter chosen by LEAVE-ONE-ANNOTATED-IMAGE-OUT over the annotated images and
   the validation normals (never on test data):
   - ``seen``:  s = d_n - w * d_seen (distance to the nearest seen-defect patch of another image);
   - ``ratio``: s = d_n / (d_n + d_seen) (no parameter);
   - ``clf`` / ``clf_class``: s = z_n + w * z_logit, a logistic regression on the seen patches against the
     hardest and random patches of the bank's own training images (self-excluded kNN), shared by all
     classes or one per class; z = (x - median) / (q99 - median) on the class's validation normals.
   The LOO criterion has two parts, each choosing its own weight: the held-out annotated image's top score
   ranked among the validation normal images' top scores of its class (the image score's w), and the patch
   AUROC of its defect patches against the validation normal patches and its own defect-free patches (the
   heat map's w); ties go to the smaller w (kNN itself).
4. Metrics with dmad_core.metrics (image AUROC, pixel AUROC, PRO), heat maps mapped back onto each class's
   own aspect ratio (evaluated with the shorter side at most 128 px: tire 128 x 171, bottle 128 x 128,
   KolektorSDD 128 x 323; every rule is compared with kNN at the same resolution).

Geometry: ``square`` squashes every image to 256 x 256 (today's product); ``aspect`` resizes the shorter side
to 256 and keeps the aspect ratio (the longer side rounded to a multiple of 16).
``--alone`` also runs each class in a model of its own (unified vs alone).
Progress goes to stderr; results to stdout (and ``--json``). Nothing is written to the working directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import uuid
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from dmad_core.backbone import FeatureExtractor
from dmad_core.cache import FeatureCache, content_hash
from dmad_core.config import BackboneConfig, DMADConfig
from dmad_core.coreset import coreset_size, greedy_coreset
from dmad_core.data.readers import CategoryDataset, ImageRecord, load_image, load_mask, read_category
from dmad_core.evaluation import draw_annotated
from dmad_core.metrics import compute_class_metrics
from dmad_core.modules import smooth_maps

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_DATA = [SHARED / "mvtec_3d_ad" / "tire", SHARED / "mvtec_ad" / "bottle", SHARED / "kolektorsdd" / "commutator"]
SIGMA = 4.0  # Gaussian smoothing of the maps at the model's input resolution (the paper's sigma at 256 px)
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ features
def backbone_config(name: str, weights: Path | None) -> BackboneConfig:
    if name == "offline":
        return DMADConfig.preset("offline").backbone
    if name == "resnet50":
        if weights is None or not weights.is_file():
            raise SystemExit("--backbone resnet50 needs --weights PATH (a timm resnet50 state dict)")
        return BackboneConfig(name="resnet50", layers=(2, 3), image_size=256, feature_dim=1536, weights="file",
                              weights_path=str(weights), resnet_v1_strides=True)
    raise SystemExit(f"unknown backbone {name}")


def input_size(native_hw: tuple[int, int], geometry: str, short: int = 256) -> tuple[int, int]:
    """(H, W) the backbone sees: square, or the shorter side = ``short`` with the aspect kept (multiple of 16)."""
    if geometry == "square":
        return short, short
    h, w = native_hw
    if h <= w:
        return short, int(round(w * short / h / 16)) * 16
    return int(round(h * short / w / 16)) * 16, short


EVAL_SHORT = 128  # see eval_size


def eval_size(native_hw: tuple[int, int], short_max: int = EVAL_SHORT) -> tuple[int, int]:
    """Pixel-metric resolution: the image's own aspect ratio, shorter side at most ``short_max`` (128 keeps
    the PRO of 400 maps affordable on 2 shared cores; the maps are smooth at that scale, and every rule is
    compared with kNN at the same resolution)."""
    h, w = native_hw
    s = min(1.0, short_max / min(h, w))
    return int(round(h * s)), int(round(w * s))


class Features:
    """Patch features (gh, gw, C) per image path for one backbone + geometry, cached on disk (float16)."""

    def __init__(self, cfg: BackboneConfig, geometry: str, cache_root: Path):
        self.cfg, self.geometry = cfg, geometry
        self.cache = FeatureCache(cache_root, f"{cfg.cache_key()}-{geometry}")
        self._extractor: FeatureExtractor | None = None
        self.seconds, self.computed = 0.0, 0

    def get(self, paths: list[Path], native_hw: tuple[int, int]) -> list[np.ndarray]:
        """Features of the images, all resized for the class's typical size ``native_hw`` (KolektorSDD's widths
        vary from 199 to 207 px: one input size per class gives one patch grid per class)."""
        self.size = input_size(native_hw, self.geometry)
        grid = (self.size[0] // 8, self.size[1] // 8)
        hashes = [content_hash(p) for p in paths]
        out = [self.cache.get(h) for h in hashes]
        missing = [i for i, f in enumerate(out) if f is None or f.shape[:2] != grid]
        if missing:
            if self._extractor is None:
                self._extractor = FeatureExtractor(self.cfg, device="cpu")  # resnet50: v1 strides by its config
            say(f"  backbone on {len(missing)} images ({self.geometry})")
        for start in range(0, len(missing), 8):
            chunk = missing[start:start + 8]
            imgs = [load_image(paths[i]) for i in chunk]
            t0 = time.perf_counter()
            feats = self._forward(imgs)
            self.seconds += time.perf_counter() - t0
            self.computed += len(chunk)
            for i, f in zip(chunk, feats):
                self.cache.put(hashes[i], f)
                out[i] = f.astype(np.float16)
        return [np.asarray(f, dtype=np.float16) for f in out]

    @torch.inference_mode()
    def _forward(self, imgs: list[np.ndarray]) -> list[np.ndarray]:
        """One backbone call per input size (images of a class share it)."""
        ex = self._extractor
        batches: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(imgs):
            batches.setdefault(self.size, []).append(i)
        res: list[np.ndarray] = [None] * len(imgs)  # type: ignore[list-item]
        for size, idx in batches.items():
            ts = [torch.from_numpy(np.array(imgs[i], copy=True)).permute(2, 0, 1).float()[None] / 255.0 for i in idx]
            x = torch.cat([F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True) for t in ts])
            out = ex((x - ex.mean) / ex.std).float().numpy()
            for j, i in enumerate(idx):
                res[i] = out[j]
        return res


# ------------------------------------------------------------------------------------------------ data
@dataclass
class ClassData:
    name: str
    dataset: CategoryDataset
    bank_paths: list[Path]
    val_paths: list[Path]
    test: list[ImageRecord]
    native_hw: tuple[int, int]
    grid: tuple[int, int] = (0, 0)
    bank_feats: list[np.ndarray] = field(default_factory=list)
    val_feats: list[np.ndarray] = field(default_factory=list)
    test_feats: list[np.ndarray] = field(default_factory=list)


def split_validation(paths: list[Path], seed: int, fraction: float = 0.1) -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(seed)
    n_val = int(round(len(paths) * fraction))
    order = rng.permutation(len(paths))
    return [paths[i] for i in sorted(order[n_val:])], [paths[i] for i in sorted(order[:n_val])]


def load_classes(data: list[Path], feats: Features, seed: int) -> list[ClassData]:
    out = []
    for d in data:
        ds = read_category(d)
        bank, val = split_validation([r.path for r in ds.train], seed)
        sizes = np.array([load_image(r.path).shape[:2] for r in ds.train[:: max(1, len(ds.train) // 25)]])
        native = (int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1])))
        c = ClassData(ds.name, ds, bank, val, ds.test, native)
        c.bank_feats, c.val_feats = feats.get(bank, native), feats.get(val, native)
        c.test_feats = feats.get([r.path for r in ds.test], native)
        c.grid = c.test_feats[0].shape[:2]
        out.append(c)
    return out


# ------------------------------------------------------------------------------------------------ search
def flat(fs: list[np.ndarray]) -> np.ndarray:
    return np.stack([f.reshape(-1, f.shape[-1]) for f in fs]).astype(np.float32)


def nearest(q: np.ndarray, b: np.ndarray, q_src: np.ndarray | None = None, b_src: np.ndarray | None = None,
            block: int = 8192) -> np.ndarray:
    """Exact Euclidean distance of each row of q to its nearest row of b (entries of the same source
    excluded when sources are given)."""
    qt, bt = torch.from_numpy(np.ascontiguousarray(q, np.float32)), torch.from_numpy(np.ascontiguousarray(b, np.float32))
    bn = (bt * bt).sum(1)
    out = torch.empty(len(qt))
    for s in range(0, len(qt), block):
        x = qt[s:s + block]
        d = (x * x).sum(1, keepdim=True) - 2 * x @ bt.T + bn
        if q_src is not None:
            same = torch.from_numpy(q_src[s:s + block])[:, None] == torch.from_numpy(b_src)[None]
            d.masked_fill_(same, float("inf"))
        out[s:s + block] = d.min(1).values
    return out.clamp_min(0).sqrt().numpy()


def nearest_per_source(q: np.ndarray, b: np.ndarray, b_src: np.ndarray, n_src: int) -> np.ndarray:
    """(len(q), n_src): distance of each query to the nearest entry of each source (inf where none)."""
    qt, bt = torch.from_numpy(np.ascontiguousarray(q, np.float32)), torch.from_numpy(np.ascontiguousarray(b, np.float32))
    src = torch.from_numpy(b_src)
    out = torch.full((len(qt), n_src), float("inf"))
    bn = (bt * bt).sum(1)
    for s in range(0, len(qt), 8192):
        x = qt[s:s + 8192]
        d = ((x * x).sum(1, keepdim=True) - 2 * x @ bt.T + bn).clamp_min(0)
        o = torch.full((len(x), n_src), float("inf"))
        o.scatter_reduce_(1, src.expand(len(x), -1), d, reduce="amin")
        out[s:s + 8192] = o
    return out.sqrt().numpy()


@dataclass
class Bank:
    vectors: np.ndarray
    classes: np.ndarray
    sources: np.ndarray  # global image index of the bank image each entry comes from


def build_bank(classes: list[ClassData], seed: int, cache: Path | None = None, ratio: float = 0.02,
               max_candidates: int = 100_000) -> Bank:
    """The product's normal bank: one greedy coreset over all classes' patches (seeded 100k candidates).
    The greedy loop takes minutes on a loaded 2-core machine, so the chosen bank is cached in ``cache``."""
    key = hashlib.sha256(json.dumps([seed, ratio, max_candidates, [(c.name, [str(p) for p in c.bank_paths]) for c in classes]]).encode()).hexdigest()[:16]
    path = None if cache is None else cache / f"bank-{key}.npz"
    if path is not None and path.exists():
        z = np.load(path)
        return Bank(z["vectors"], z["classes"], z["sources"])
    rows, cls, src = [], [], []
    n_img = 0
    for c in classes:
        for f in c.bank_feats:
            rows.append(f.reshape(-1, f.shape[-1]))
            cls.append(np.full(len(rows[-1]), c.name, "<U32"))
            src.append(np.full(len(rows[-1]), n_img, np.int64))
            n_img += 1
    n = sum(len(r) for r in rows)
    rng = np.random.default_rng(seed)
    cand = np.sort(rng.choice(n, size=min(n, max_candidates), replace=False))
    allf = np.concatenate(rows)  # float16: half the memory
    sel = greedy_coreset(allf[cand].astype(np.float32), coreset_size(n, ratio), 64, seed, max_candidates=max_candidates)
    idx = cand[sel]
    bank = Bank(allf[idx].astype(np.float32), np.concatenate(cls)[idx], np.concatenate(src)[idx])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.npz")
        np.savez(tmp, vectors=bank.vectors, classes=bank.classes, sources=bank.sources)
        os.replace(tmp, path)
    return bank


# ------------------------------------------------------------------------------------------------ masks, maps
def covered_patches(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Flat indices of the patches a defect covers: area coverage >= 0.5, or, for a defect thinner than half
    a patch, at least half the best-covered patch's coverage (a thin crack still gives its cells)."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    cover = F.adaptive_avg_pool2d(m, grid).reshape(-1).numpy()
    if cover.max() <= 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(cover >= min(0.5, 0.5 * cover.max()))


def heat_maps(grids: np.ndarray, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Patch-score grids -> maps on the image's own pixels: bilinear to the model's input size, Gaussian
    (sigma 4 input pixels), bilinear to the evaluation size."""
    t = torch.from_numpy(np.asarray(grids, np.float32))[:, None]
    t = F.interpolate(t, size=in_hw, mode="bilinear", align_corners=False)[:, 0]
    t = smooth_maps(t, SIGMA)
    return F.interpolate(t[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0].numpy()


def top5(s: np.ndarray) -> np.ndarray:
    return np.sort(s, axis=1)[:, -5:].mean(1)


# ------------------------------------------------------------------------------------------------ study
@dataclass
class Seeded:
    """Everything of one seed that does not depend on K: bank distances and the classifier negatives."""

    classes: list[ClassData]
    d_test: dict[str, np.ndarray]  # (images, patches)
    d_val: dict[str, np.ndarray]
    neg: dict[str, np.ndarray]  # hard + random normal patches of bank images (features)
    scale: dict[str, tuple[float, float]]  # median, q99 of validation normal patch distances
    masks: dict[str, list[np.ndarray]]  # test masks at evaluation size (all-zero for normal images)


def prepare(classes: list[ClassData], seed: int, cache: Path | None = None, neg_images: int = 20, neg_top: int = 10, neg_random: int = 10) -> Seeded:
    bank = build_bank(classes, seed, cache)
    say(f"  bank {len(bank.vectors)} entries ({', '.join(f'{c.name} {int((bank.classes == c.name).sum())}' for c in classes)})")
    d_test, d_val, neg, scale, masks = {}, {}, {}, {}, {}
    rng = np.random.default_rng(seed + 7)
    first = 0
    for c in classes:
        rows = bank.classes == c.name
        b, bsrc = bank.vectors[rows], bank.sources[rows]
        tq, vq = flat(c.test_feats), flat(c.val_feats)
        d_test[c.name] = nearest(tq.reshape(-1, tq.shape[-1]), b).reshape(tq.shape[:2])
        d_val[c.name] = nearest(vq.reshape(-1, vq.shape[-1]), b).reshape(vq.shape[:2])
        scale[c.name] = (float(np.median(d_val[c.name])), float(np.quantile(d_val[c.name], 0.99)))
        pick = np.sort(rng.choice(len(c.bank_feats), size=min(neg_images, len(c.bank_feats)), replace=False))
        nq = flat([c.bank_feats[i] for i in pick])
        qsrc = np.repeat(first + pick, nq.shape[1])
        dn = nearest(nq.reshape(-1, nq.shape[-1]), b, qsrc, bsrc).reshape(nq.shape[:2])
        chosen = [np.argsort(d)[-neg_top:] for d in dn]
        chosen = [np.unique(np.r_[ch, rng.choice(nq.shape[1], neg_random, replace=False)]) for ch in chosen]
        neg[c.name] = np.concatenate([nq[i, ch] for i, ch in enumerate(chosen)])
        first += len(c.bank_feats)
        say(f"  {c.name}: distances done")
        ev = eval_size(c.native_hw)
        masks[c.name] = [load_mask(r.mask_path, ev) if r.mask_path else np.zeros(ev, bool) for r in c.test]
    return Seeded(classes, d_test, d_val, neg, scale, masks)


def class_metrics(c: ClassData, st: Seeded, keep: np.ndarray, patch: np.ndarray, agg: str, pixel: bool,
                  map_patch: np.ndarray | None = None) -> dict:
    """Metrics of one class for patch scores (images, patches) of its test images ``keep``; the heat maps
    come from ``map_patch`` when given (image and pixel scores may use different weights)."""
    recs = [c.test[i] for i in keep]
    labels = np.array([r.label for r in recs])
    img = patch.max(1) if agg == "max" else top5(patch)
    has_masks = any(r.mask_path is not None for r in recs)
    if not pixel or not has_masks:
        m = compute_class_metrics(labels, img)
    else:
        grids = (patch if map_patch is None else map_patch).reshape(len(recs), *c.grid)
        in_hw = (c.grid[0] * 8, c.grid[1] * 8)  # layer 2's stride is 8 on both backbones
        maps = heat_maps(grids, in_hw, eval_size(c.native_hw))
        m = compute_class_metrics(labels, img, np.stack([st.masks[c.name][i] for i in keep]), maps)
    d = m.to_dict()
    return {k: d[k] for k in ("image_auroc", "pixel_auroc", "pro")}


def loo_criterion(ann_scores: list[np.ndarray], ann_masks: list[np.ndarray], val_scores: list[np.ndarray]) -> tuple[float, float]:
    """Over held-out annotated images: (mean rank of the image's top score among its class's validation
    normal images' top scores, mean patch AUROC of its defect patches against the validation normal patches
    and its own clean patches). The image part chooses the image score's weight, the patch part the map's:
    one weight for both let the patch gains pull tire's image AUROC down (measured, D_findings.md)."""
    ranks, aucs = [], []
    for s, m, v in zip(ann_scores, ann_masks, val_scores):
        ranks.append(float((v.max(1) < s.max()).mean() + 0.5 * (v.max(1) == s.max()).mean()))
        y = np.r_[np.ones(m.sum()), np.zeros((~m).sum() + v.size)]
        aucs.append(roc_auc_score(y, np.r_[s[m], s[~m], v.ravel()]))
    return float(np.mean(ranks)), float(np.mean(aucs))


def pick(crit: dict, part: int):
    """The weight with the best criterion part; ties (4 decimals) go to the smallest weight (kNN first)."""
    return max(crit, key=lambda key: (round(crit[key][part], 4), -(key[1] if isinstance(key, tuple) else key)))


def zscore(x: np.ndarray, med: float, q99: float) -> np.ndarray:
    return (x - med) / max(q99 - med, 1e-6)


def run_k(st: Seeded, k: int, seed: int, rules: list[str], ws: list[float], log: dict,
          Cs: tuple[float, ...] = (1.0,)) -> dict:
    """All rules at one K: parameters by leave-one-annotated-image-out, then test metrics."""
    classes = st.classes
    ann = []  # (class index, test index, covered patch indices)
    for ci, c in enumerate(classes):
        for r in draw_annotated(c.dataset, k, seed):
            ti = c.test.index(r)
            idx = covered_patches(load_mask(r.mask_path), c.grid)
            if len(idx):
                ann.append((ci, ti, idx))
    n_src = len(ann)
    held = {(ci, ti) for ci, ti, _ in ann}
    keep = {c.name: np.array([i for i in range(len(c.test)) if (ci, i) not in held]) for ci, c in enumerate(classes)}
    seen = np.concatenate([flat([classes[ci].test_feats[ti]])[0][idx] for ci, ti, idx in ann]) if ann else None
    seen_src = np.concatenate([np.full(len(idx), j) for j, (_, _, idx) in enumerate(ann)]) if ann else None
    seen_cls = np.concatenate([np.full(len(idx), classes[ci].name, "<U32") for ci, _, idx in ann]) if ann else None
    out = {}
    for ci, c in enumerate(classes):
        dn = st.d_test[c.name][keep[c.name]]
        out[("knn", c.name)] = class_metrics(c, st, keep[c.name], dn, "max", True)
        out[("knn_top5", c.name)] = class_metrics(c, st, keep[c.name], dn, "top5", False)
    say(f"    K={k}: kNN metrics done")
    if not ann:
        return out
    say(f"    K={k}: {n_src} annotated images, {len(seen)} seen patches")
    # distances to the seen set, per source image (so that leave-one-out is a column mask)
    dseen_test, dseen_val, dseen_ann = {}, {}, {}
    for c in classes:
        tq = flat([c.test_feats[i] for i in keep[c.name]])
        dseen_test[c.name] = nearest_per_source(tq.reshape(-1, tq.shape[-1]), seen, seen_src, n_src).reshape(*tq.shape[:2], n_src)
        vq = flat(c.val_feats)
        dseen_val[c.name] = nearest_per_source(vq.reshape(-1, vq.shape[-1]), seen, seen_src, n_src).reshape(*vq.shape[:2], n_src)
    for j, (ci, ti, idx) in enumerate(ann):
        q = flat([classes[ci].test_feats[ti]])[0]
        dseen_ann[j] = nearest_per_source(q, seen, seen_src, n_src)
    say("      distances to the seen set done")

    def ann_mask(j: int) -> np.ndarray:
        ci, ti, idx = ann[j]
        m = np.zeros(np.prod(classes[ci].grid), bool)
        m[idx] = True
        return m

    def loo_inputs(score_fn) -> tuple[list, list, list]:
        """score_fn(class name, d_n, d_seen without source j, j) for each held-out annotated image j."""
        a_s, a_m, v_s = [], [], []
        for j, (ci, ti, idx) in enumerate(ann):
            name = classes[ci].name
            excl = np.ones(n_src, bool)
            excl[j] = False
            d_a = dseen_ann[j][:, excl].min(1) if excl.any() else np.full(len(dseen_ann[j]), np.inf)
            d_v = dseen_val[name][:, :, excl].min(2) if excl.any() else np.full(st.d_val[name].shape, np.inf)
            a_s.append(score_fn(name, st.d_test[name][ti][None], d_a[None], j)[0])
            a_m.append(ann_mask(j))
            v_s.append(score_fn(name, st.d_val[name], d_v, j))
        return a_s, a_m, v_s

    choice = {}
    if "seen" in rules:
        crit = {}
        for w in ws:
            crit[w] = loo_criterion(*loo_inputs(lambda n, d, s, j, w=w: d - w * np.minimum(s, 1e6)))
        w_img, w_pix = pick(crit, 0), pick(crit, 1)
        choice["seen"] = ((w_img, w_pix), crit)
        say("      seen: LOO done")
        for c in classes:
            dn, ds_ = st.d_test[c.name][keep[c.name]], dseen_test[c.name].min(2)
            out[("seen", c.name)] = class_metrics(c, st, keep[c.name], dn - w_img * ds_, "max", True, dn - w_pix * ds_)
    if "ratio" in rules:
        for c in classes:
            dn = st.d_test[c.name][keep[c.name]]
            s = dn / (dn + dseen_test[c.name].min(2))
            out[("ratio", c.name)] = class_metrics(c, st, keep[c.name], s, "max", True)
    for rule in [r for r in rules if r.startswith("clf")]:
        per_class = rule == "clf_class"

        def fit(exclude: int | None, only: str | None, C: float) -> tuple[StandardScaler, LogisticRegression]:
            rows = seen_src != exclude if exclude is not None else np.ones(len(seen), bool)
            if only is not None:
                rows &= seen_cls == only
            pos = seen[rows]
            negs = np.concatenate([st.neg[n] for n in st.neg if only is None or n == only])
            x = np.concatenate([pos, negs])
            y = np.r_[np.ones(len(pos)), np.zeros(len(negs))]
            sc = StandardScaler().fit(x)
            return sc, LogisticRegression(C=C, max_iter=300, class_weight="balanced").fit(sc.transform(x), y)

        def logit(model, q: np.ndarray) -> np.ndarray:
            sc, lr = model
            return lr.decision_function(sc.transform(q.reshape(-1, q.shape[-1]))).reshape(q.shape[:-1])

        best = None
        crits = {}
        for C in Cs:
            # leave-one-out models: one fit per annotated image (per class: its own class's seen patches)
            loo_models = {}
            for j, (ci, _, _) in enumerate(ann):
                name = classes[ci].name
                has_pos = (seen_src != j) & ((seen_cls == name) if per_class else True)
                loo_models[j] = fit(j, name if per_class else None, C) if has_pos.any() else None
            parts = {}
            for j, (ci, ti, idx) in enumerate(ann):
                name = classes[ci].name
                md = loo_models[j]
                la = logit(md, flat([classes[ci].test_feats[ti]])[0]) if md else np.zeros(np.prod(classes[ci].grid))
                lv = logit(md, flat(classes[ci].val_feats)) if md else np.zeros(st.d_val[name].shape)
                med, q99 = float(np.median(lv)), float(np.quantile(lv, 0.99))
                parts[j] = (zscore(la, med, q99), zscore(lv, med, q99))
            for w in ws:
                a_s, a_m, v_s = [], [], []
                for j, (ci, ti, idx) in enumerate(ann):
                    name = classes[ci].name
                    zn = lambda d: zscore(d, *st.scale[name])  # noqa: E731
                    a_s.append(zn(st.d_test[name][ti]) + w * parts[j][0])
                    a_m.append(ann_mask(j))
                    v_s.append(zn(st.d_val[name]) + w * parts[j][1])
                crits[(C, w)] = loo_criterion(a_s, a_m, v_s)
        (C, w_img), (C_pix, w_pix) = pick(crits, 0), pick(crits, 1)
        say(f"      {rule}: LOO done")
        choice[rule] = (((C, w_img), (C_pix, w_pix)), {f"{c}/{w}": v for (c, w), v in crits.items()})
        for c in classes:
            has = (seen_cls == c.name).any() or not per_class
            md = fit(None, c.name if per_class else None, C) if has else None
            tq = flat([c.test_feats[i] for i in keep[c.name]])
            lt = logit(md, tq) if md else np.zeros(tq.shape[:2])
            lv = logit(md, flat(c.val_feats)) if md else np.zeros(st.d_val[c.name].shape)
            zn = zscore(st.d_test[c.name][keep[c.name]], *st.scale[c.name])
            zl = zscore(lt, float(np.median(lv)), float(np.quantile(lv, 0.99)))
            out[(rule, c.name)] = class_metrics(c, st, keep[c.name], zn + w_img * zl, "max", True, zn + w_pix * zl)
        say(f"      {rule}: test metrics done")
    log[f"seed{seed}/K{k}"] = {r: (str(v[0]), {str(a): [round(x, 4) for x in b] for a, b in v[1].items()}) for r, v in choice.items()}
    say(f"    K={k} choices: " + "; ".join(f"{r} -> {v[0]}" for r, v in choice.items()))
    return out


def study(data: list[Path], feats: Features, seeds: list[int], ks: list[int], rules: list[str], ws: list[float],
          tag: str) -> tuple[dict, dict]:
    rows: dict = {}
    log: dict = {}
    for seed in seeds:
        say(f"[{tag}] seed {seed}: features and bank")
        classes = load_classes(data, feats, seed)
        st = prepare(classes, seed, feats.cache.root / feats.cache.config_key)
        for k in ks:
            res = run_k(st, k, seed, rules if k > 0 else [], ws, log)
            for (rule, cname), m in res.items():
                say(f"    K={k} {rule:<10} {cname:<12} " + " / ".join("-" if v is None else f"{100 * v:.1f}" for v in m.values()))
            for (rule, cname), m in res.items():
                rows.setdefault((k, rule, cname), []).append(m)
    return rows, log


def summarise(rows: dict, classes: list[str]) -> list[dict]:
    table = []
    for (k, rule, cname), ms in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        rec = {"K": k, "rule": rule, "class": cname, "n_seeds": len(ms)}
        for metric in ("image_auroc", "pixel_auroc", "pro"):
            v = [m[metric] for m in ms if m[metric] is not None]
            rec[metric] = round(100 * float(np.mean(v)), 1) if v else None
            rec[metric + "_sd"] = round(100 * float(np.std(v)), 1) if v else None
        table.append(rec)
    # means over classes (pixel metrics over the classes that have them)
    for k in sorted({r["K"] for r in table}):
        for rule in sorted({r["rule"] for r in table if r["K"] == k}):
            sub = [r for r in table if r["K"] == k and r["rule"] == rule and r["class"] in classes]
            rec = {"K": k, "rule": rule, "class": "mean", "n_seeds": sub[0]["n_seeds"]}
            for metric in ("image_auroc", "pixel_auroc", "pro"):
                v = [r[metric] for r in sub if r[metric] is not None]
                rec[metric] = round(float(np.mean(v)), 1) if v else None
            table.append(rec)
    return table


def merge(paths: list[Path], key: str = "unified") -> list[dict]:
    """Mean (and spread) over runs of one seed each, e.g. seeds run as parallel processes."""
    runs = [json.loads(p.read_text())[key] for p in paths]
    out = []
    for rec in runs[0]:
        same = [r for run in runs for r in run if (r["K"], r["rule"], r["class"]) == (rec["K"], rec["rule"], rec["class"])]
        m = {"K": rec["K"], "rule": rec["rule"], "class": rec["class"], "n_seeds": len(same)}
        for metric in ("image_auroc", "pixel_auroc", "pro"):
            v = [r[metric] for r in same if r[metric] is not None]
            m[metric] = round(float(np.mean(v)), 1) if v else None
            m[metric + "_sd"] = round(float(np.std(v)), 1) if len(v) > 1 else None
        out.append(m)
    return out


def print_wide(table: list[dict], title: str) -> None:
    """class x rule rows, one column group per K: image AUROC / pixel AUROC / PRO."""
    ks = sorted({r["K"] for r in table})
    print(f"\n## {title}")
    print("| class | rule | " + " | ".join(f"K={k} I / P / PRO" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    by = {(r["K"], r["rule"], r["class"]): r for r in table}
    names = sorted({r["class"] for r in table if r["class"] != "mean"}) + ["mean"]
    order = ["knn", "knn_top5", "seen", "ratio", "clf", "clf_class"]
    rules = sorted({r["rule"] for r in table}, key=lambda x: order.index(x) if x in order else 99)
    for c in names:
        for rule in rules:
            cells = [by.get((k, rule, c)) for k in ks]
            if not any(cells):
                continue
            print(f"| {c} | {rule} | " + " | ".join(
                "" if r is None else f"{f(r['image_auroc'])} / {f(r['pixel_auroc'])} / {f(r['pro'])}" for r in cells) + " |")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", default=DEFAULT_DATA, help="category folders (default: the three shared classes)")
    ap.add_argument("--backbone", choices=("offline", "resnet50"), default="offline")
    ap.add_argument("--weights", type=Path, default=Path("/work/notes/resnet50_timm.pt"), help="timm resnet50 state dict (for --backbone resnet50)")
    ap.add_argument("--geometry", choices=("square", "aspect"), default="square")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="masked defects per class (0: unsupervised only)")
    ap.add_argument("--rules", nargs="+", default=["seen", "ratio", "clf", "clf_class"])
    ap.add_argument("--w", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0, 8.0],
                    help="weights tried by the leave-one-out choice")
    ap.add_argument("--alone", action="store_true", help="also each class in a model of its own")
    ap.add_argument("--alone-only", action="store_true", help="only each class in a model of its own")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/research-cache"), help="feature cache folder")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: measured 2.5x faster per image than 2 on the shared, loaded 2-core machine)")
    ap.add_argument("--json", type=Path, default=None, help="write the tables and the leave-one-out choices here")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="only print the mean over these --json files (one seed each) and exit")
    args = ap.parse_args()
    if args.merge:
        for key in ("unified", "alone"):
            if key in json.loads(args.merge[0].read_text()):
                print_wide(merge(args.merge, key), f"{key}: mean over {len(args.merge)} runs")
        return
    torch.set_num_threads(args.threads)
    cfg = backbone_config(args.backbone, args.weights)
    feats = Features(cfg, args.geometry, args.cache)
    names = [d.name for d in args.data]
    title = f"{args.backbone}, {args.geometry}, seeds {args.seeds}"
    result: dict = {"title": title}
    if not args.alone_only:
        rows, log = study(args.data, feats, args.seeds, args.k, args.rules, args.w, "unified")
        result |= {"unified": summarise(rows, names), "choices": log}
    if feats.computed:
        result["backbone_ms_per_image"] = round(1000 * feats.seconds / feats.computed, 1)
        say(f"backbone: {result['backbone_ms_per_image']} ms an image ({feats.computed} images)")
    if "unified" in result:
        print_wide(result["unified"], f"unified: {title}")
    if args.alone or args.alone_only:
        alone = []
        for d in args.data:
            r, lg = study([d], feats, args.seeds, args.k, args.rules, args.w, f"alone {d.name}")
            alone += summarise(r, [d.name])
            result["choices_alone_" + d.name] = lg
        result["alone"] = [r for r in alone if r["class"] != "mean"]
        print_wide(result["alone"], f"each class alone: {title}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
