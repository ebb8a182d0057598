"""Training the mapper: the validation split, the training sets (patches with their bank neighbours),
batches, pseudo-anomalies, the validation loss and early stopping on it.

Nothing here picks anything on test data: epochs are chosen on a validation split of the normal training
images, and the trained net is left in eval mode for inference.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dmad_core.config import MapperConfig
from dmad_core.items import ImageItem, Progress, class_rng, no_progress
from dmad_core.memory import DualMemory, built
from dmad_core.modules import DMADNet, hinge_loss
from dmad_core.progress_bar import make_bar


@dataclass
class TrainSet:
    """Features and precomputed bank neighbours of the images the mapper learns from."""

    feats: list[np.ndarray]  # per image (N, C) float32, standardised
    nn_normal: list[np.ndarray]  # per image (N,) index into the normal bank
    nn_abnormal: list[np.ndarray]  # per image (N,) index into the abnormal bank
    patches: list[np.ndarray | None]  # per image: the patch indices to learn from (None = all)
    sources: list[int]  # per image: provenance id (self-match exclusion)
    categories: list[str]  # per image: its class (class-aware normal search)

    @staticmethod
    def of(memory: DualMemory, items: Sequence[ImageItem], feats: Sequence[np.ndarray], exclude: bool,
           patches: list[np.ndarray | None] | None = None, progress: Progress = no_progress,
           desc: str = "nearest neighbours") -> TrainSet:
        flat = [f.reshape(-1, memory.dim) for f in feats]
        return TrainSet(flat, *memory.neighbours(items, flat, exclude, progress, desc), patches or [None] * len(flat),
                        [it.source for it in items], [it.category for it in items])


def split_validation(items: Sequence[ImageItem], fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training, validation) images: ``fraction`` of each class held out (none below five images)."""
    train, val = [], []
    for cat in sorted({it.category for it in items}):
        cat_items = [it for it in items if it.category == cat]
        n_val = int(round(len(cat_items) * fraction))
        n_val = min(n_val, len(cat_items) - 1) if len(cat_items) >= 5 else 0
        # per class: a class's split must not depend on which other classes share the model (measured: tire's
        # kNN image AUROC moved by 2 points between tire alone and tire with two other classes)
        order = class_rng(seed, cat).permutation(len(cat_items))
        val += [cat_items[i] for i in order[:n_val]]
        train += [cat_items[i] for i in order[n_val:]]
    return train, val


def validation_patches(feats: Sequence[np.ndarray], mc: MapperConfig) -> list[np.ndarray | None]:
    """The fixed (seeded) subset of each validation image's patches scored every epoch (CPU cost)."""
    rng = np.random.default_rng(mc.seed + 3)
    return [None if mc.validation_patches_per_image >= len(f.reshape(-1, f.shape[-1]))
            else np.sort(rng.choice(len(f.reshape(-1, f.shape[-1])), size=mc.validation_patches_per_image,
                                    replace=False)) for f in feats]


def new_net(dim: int, mc: MapperConfig) -> DMADNet:
    return DMADNet(dim, mc.attention_dim, mc.hidden_dim, mc.n_layers, mc.knowledge == "attention",
                   distance_features=mc.distance_features, distance_prior=mc.distance_prior, margin=mc.margin,
                   correction_bound=mc.correction_bound, key_pool=mc.attention_key_pool)


def noise_factor(normal: TrainSet) -> torch.Tensor:
    """A (C, C) factor A with A^T A = S / mean(eig S), S the covariance of normal training patches:
    ``z @ A`` for white z has that covariance (used by ``pseudo_noise="covariance"``)."""
    flat = np.concatenate([f[::8] for f in normal.feats]).astype(np.float64)
    w, v = np.linalg.eigh(np.cov(flat, rowvar=False))
    w = np.clip(w, 0, None)
    return torch.from_numpy(((v * np.sqrt(w / max(w.mean(), 1e-12))) @ v.T).astype(np.float32))


def noise_scales(shape: tuple[int, ...], mc: MapperConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-patch noise std, log-uniform in [pseudo_noise_std, pseudo_noise_std_max] (SimpleNet-style
    Gaussian pseudo-anomalies, added to the features before knowledge so bank distances grow with it)."""
    lo, hi = np.log(mc.pseudo_noise_std), np.log(max(mc.pseudo_noise_std_max, mc.pseudo_noise_std))
    u = torch.rand(*shape, 1, generator=generator)
    return torch.exp(lo + (hi - lo) * u)


class MapperTrainer:
    """Trains a mapper on the banks of ``memory`` under ``config`` (the regime's loss weights)."""

    def __init__(self, config: MapperConfig, memory: DualMemory, device: torch.device):
        self.config = config
        self.memory = memory
        self.device = device

    def train(self, net: DMADNet | None, normal: TrainSet, val: TrainSet, ann: TrainSet, epochs: int,
              progress: Progress, patience: int = 0) -> tuple[DMADNet, list[dict]]:
        """Trains ``net`` (a copy; a new one when None) for up to ``epochs`` epochs and returns the state
        with the lowest validation loss (the starting point included) and the loss history; with
        ``patience`` > 0 it stops once that many epochs in a row have not improved on the best."""
        mc = self.config
        torch.manual_seed(mc.seed)
        rng = np.random.default_rng(mc.seed)
        net = (new_net(self.memory.dim, mc) if net is None else copy.deepcopy(net)).to(self.device)
        opt = torch.optim.AdamW([{"params": net.enhancer.parameters(), "lr": mc.lr_knowledge},
                                 {"params": net.mapper.parameters(), "lr": mc.lr_mapper}], weight_decay=mc.weight_decay)
        self._fit_distance_scaler(net, normal)
        factor = noise_factor(normal)
        # The starting point is a candidate too: with the distance prior an untrained mapper is the kNN
        # baseline, and on a warm start the previous mapper; training must beat it on validation data.
        best_val = self.validation_loss(net, val, ann, rng, factor) if val.feats else float("inf")
        best_state, history = copy.deepcopy(net.state_dict()), [{"epoch": -1, "train_loss": None, "val_loss": best_val}]
        since_best = 0
        bar = make_bar(range(epochs), desc="training mapper", unit="epoch")
        for epoch in bar:
            net.train()
            losses = [self._step(net, opt, normal, ann, rng, factor) for _ in range(mc.steps_per_epoch)]
            val_loss = self.validation_loss(net, val, ann, rng, factor) if val.feats else float(np.mean(losses))
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss})
            if val_loss < best_val:
                best_val, best_state, since_best = val_loss, copy.deepcopy(net.state_dict()), 0
            else:
                since_best += 1
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", val=f"{val_loss:.4f}")
            progress((epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}, validation {val_loss:.4f}")
            if patience and since_best >= patience and epoch + 1 < epochs:
                progress(1.0, f"stopped after epoch {epoch + 1}/{epochs}: validation loss not improved for "
                              f"{patience} epochs (best {best_val:.4f})")
                break
        bar.close()
        net.load_state_dict(best_state)
        return net.eval(), history

    def _step(self, net: DMADNet, opt: torch.optim.Optimizer, normal: TrainSet, ann: TrainSet,
              rng: np.random.Generator, factor: torch.Tensor) -> float:
        """One optimiser step on a batch of normal images, their pseudo-anomalies and annotated defects."""
        mc = self.config
        which = rng.choice(len(normal.feats), size=min(mc.images_per_batch, len(normal.feats)), replace=False)
        q, nn_n, nn_a, img, valid, src, cats = self._batch(normal, which, mc.patches_per_image, rng)
        q_p, nn_np, nn_ap = self._pseudo(q, nn_n, nn_a, src, cats, factor)
        o, prior = net.represent(torch.cat([q, q_p]), torch.cat([nn_n, nn_np]), torch.cat([nn_a, nn_ap]),
                                 torch.cat([img, img]))
        v2 = torch.cat([valid, valid])
        out = net.head(o[v2], None if prior is None else prior[v2])
        out_n, out_p = out[: int(valid.sum())], out[int(valid.sum()):]
        out_a = None
        if ann.feats and mc.lambda_annotated:
            wa = rng.choice(len(ann.feats), size=min(mc.images_per_batch, len(ann.feats)), replace=False)
            qa, na, aa, ia, va, _, _ = self._batch(ann, wa, mc.patches_per_image, rng)
            oa, pa = net.represent(qa, na, aa, ia)
            out_a = net.head(oa[va], None if pa is None else pa[va])
        loss = hinge_loss(out_n, out_p, out_a, mc.margin, mc.lambda_pseudo, mc.lambda_annotated)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def validation_loss(self, net: DMADNet, val: TrainSet, ann: TrainSet, rng: np.random.Generator,
                        factor: torch.Tensor) -> float:
        """Held-out normal images (a fixed subset of their patches, and pseudo-anomalies made from them,
        seeded) under the training loss; the annotated-defect term uses the training annotations (too few
        to hold any out)."""
        mc = self.config
        net.eval()
        g = torch.Generator(device="cpu").manual_seed(mc.seed)
        total = []
        for start in range(0, len(val.feats), mc.images_per_batch):
            which = list(range(start, min(start + mc.images_per_batch, len(val.feats))))
            q, nn_n, nn_a, img, valid, _, cats = self._batch(val, which, None, rng)
            q_p, nn_np, nn_ap = self._pseudo(q, nn_n, nn_a, None, cats, factor, g)
            out_n = net(q, nn_n, nn_a, img)[valid]
            out_p = net(q_p, nn_np, nn_ap, img)[valid]
            out_a = None
            if ann.feats and mc.lambda_annotated:
                qa, na, aa, ia, va, _, _ = self._batch(ann, range(len(ann.feats)), None, rng)
                out_a = net(qa, na, aa, ia)[va]
            total.append(float(hinge_loss(out_n, out_p, out_a, mc.margin, mc.lambda_pseudo, mc.lambda_annotated)))
        return float(np.mean(total))

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)

    def _batch(self, ts: TrainSet, which: Sequence[int] | np.ndarray, n_patches: int | None, rng: np.random.Generator):
        """Tensors (q, nn_n, nn_a, image_feats, valid) and arrays (sources, categories) for the chosen images;
        P patches sampled per image (``sources``, ``categories`` (B, P): each patch's image id and class, for
        self-match exclusion and the class-aware search when searching again)."""
        mn, ma = built(self.memory.normal_bank_).vectors, built(self.memory.abnormal_bank_).vectors
        qs, nns, nas, imgs = [], [], [], []
        for i in which:
            f = ts.feats[i]
            own = ts.patches[i]
            allowed = own if own is not None else np.arange(len(f))
            sel = allowed if n_patches is None or n_patches >= len(allowed) else rng.choice(allowed, size=n_patches,
                                                                                           replace=False)
            qs.append(f[sel])
            nns.append(mn[ts.nn_normal[i][sel]])
            nas.append(ma[ts.nn_abnormal[i][sel]])
            imgs.append(f)
        p = max(len(q) for q in qs)

        def padded(arrs: list[np.ndarray]) -> torch.Tensor:
            return self._tensor(np.stack([np.pad(a.astype(np.float32), ((0, p - len(a)), (0, 0))) for a in arrs]))

        valid = np.stack([np.arange(p) < len(q) for q in qs])
        sources = np.repeat(np.array([ts.sources[i] if ts.sources else -1 for i in which], np.int64)[:, None], p, axis=1)
        categories = np.repeat(np.array([ts.categories[i] if ts.categories else "" for i in which])[:, None], p, axis=1)
        return (padded(qs), padded(nns), padded(nas), self._tensor(np.stack([x.astype(np.float32) for x in imgs])),
                self._tensor(valid), sources, categories)

    def _pseudo(self, q: torch.Tensor, nn_n: torch.Tensor, nn_a: torch.Tensor, sources: np.ndarray | None,
                categories: np.ndarray | None, factor: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pseudo-anomalies: Gaussian noise on the features (SimpleNet), and, when ``pseudo_requery``, the
        nearest neighbours of the noisy features searched again in both banks (self-matches excluded when
        ``sources`` is given), as a real anomalous patch gets its neighbours at test time."""
        mc = self.config
        noise = torch.randn(q.shape, generator=generator).to(q)
        if mc.pseudo_noise == "covariance":
            noise = noise @ factor.to(q)
        qp = q + noise * noise_scales(q.shape[:2], mc, generator).to(q)
        if not mc.pseudo_requery:
            return qp, nn_n, nn_a
        flat = qp.detach().reshape(-1, q.shape[-1]).cpu().numpy()
        v_n, v_a = self.memory.nearest_vectors(flat, None if sources is None else sources.reshape(-1),
                                               None if categories is None else categories.reshape(-1))

        def as_q(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(q).reshape(q.shape)

        return qp, as_q(v_n), as_q(v_a)

    def _fit_distance_scaler(self, net: DMADNet, normal: TrainSet) -> None:
        """Distance statistics of normal training patches (self-matches excluded, so they look like a test
        patch's) for the standardised distances the mapper sees."""
        mn, ma = built(self.memory.normal_bank_).vectors, built(self.memory.abnormal_bank_).vectors
        rows = []
        for f, i_n, i_a in zip(normal.feats, normal.nn_normal, normal.nn_abnormal, strict=True):
            q = f[::4].astype(np.float32)
            rows.append(np.stack([np.linalg.norm(q - mn[i_n[::4]], axis=1), np.linalg.norm(q - ma[i_a[::4]], axis=1)], 1))
        net.enhancer.distances.fit(torch.from_numpy(np.concatenate(rows)))
