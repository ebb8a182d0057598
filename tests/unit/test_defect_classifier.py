"""The default scorer (dmad_core/defect_classifier.py): the kNN distance in each class's unit, corrected by a
per-class classifier of annotated defects whose weight is chosen by leave-one-annotated-image-out; and the
memory's per-class coreset and thin-defect patch rule that it relies on. Synthetic categories, offline
backbone (the real-data figures come from benchmarks/quality.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from dmad_core import banks
from dmad_core.config import BankConfig, ClassifierConfig, DMADConfig
from dmad_core.coreset import coreset_size
from dmad_core.data import load_mask, make_synthetic_category, read_category
from dmad_core.defect_classifier import DefectClassifierScorer, LinearPatchClassifier, Scale, _best
from dmad_core.items import DefectAnnotation, ImageItem, class_rng, normal_percentile, top_k_mean
from dmad_core.memory import DualMemory
from dmad_core.model import DMAD, FeatureStore


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classifier")
    roots = [make_synthetic_category(tmp / "data", name, texture=tex, n_train=14, n_test_good=4, n_test_defect=8,
                                     seed=i) for i, (name, tex) in enumerate([("grid", "grid"), ("dots", "dots")])]
    cfg = DMADConfig.preset("offline")
    assert cfg.score.scorer == "classifier"  # the default
    store = FeatureStore(cfg, tmp / "features")
    dss = [read_category(r) for r in roots]
    normal = [ImageItem.from_path(r.path, d.name) for d in dss for r in d.train]
    model = DMAD(cfg, store).fit(normal, [])
    return model, dss, store


def items_of(ds, label=None):
    return [ImageItem.from_path(r.path, ds.name) for r in ds.test if label is None or r.label == label]


def masked(ds, n):
    return [DefectAnnotation(ImageItem.from_path(r.path, ds.name), load_mask(r.mask_path))
            for r in [r for r in ds.test if r.label == 1][:n]]


def test_unsupervised_score_is_the_knn_distance_in_the_class_unit(fitted):
    """Without annotations the model starts from the kNN map: each patch score is the normal-bank distance
    (PatchCore's) shifted and scaled per class, so heat maps rank pixels exactly as kNN does."""
    model, dss, _ = fitted
    state = model.fitted()
    assert state.net is None and state.memory.abnormal_bank_.part_sizes()[banks.OUTLIER] == 0  # no mapper, no outliers
    for ds in dss:
        items = items_of(ds)
        scale = state.scorer.classes_[ds.name].distance_scale
        assert scale.q99 > scale.median > 0
        for p, k in zip(model.predict(items, progress_bar=False), model.knn_predict(items), strict=True):
            np.testing.assert_allclose(p.patch_scores, scale.apply(k.patch_scores), rtol=1e-5, atol=1e-5)
            assert p.image_score == pytest.approx(top_k_mean(p.patch_scores, model.config.score.top_k), abs=1e-6)


def test_annotations_train_a_classifier_for_their_class_only(fitted, tmp_path):
    model, dss, store = fitted
    model.save(tmp_path / "start")
    work = DMAD.load(tmp_path / "start", store)
    grid, dots = dss
    before = work.predict(items_of(dots), progress_bar=False)
    work.update(masked(grid, 4))
    scorer = work.fitted().scorer
    state = scorer.classes_
    assert state["grid"].classifier is not None and state["dots"].classifier is None
    assert set(scorer.selection_) == {"grid"}
    assert set(scorer.selection_["grid"]) == set(work.config.classifier.weights)
    assert state["grid"].image_weight in work.config.classifier.weights
    after = work.predict(items_of(dots), progress_bar=False)  # a class without annotations keeps its scores
    assert all(np.array_equal(a.patch_scores, b.patch_scores) for a, b in zip(before, after, strict=True))
    # the classifier separates the held-in defect patches from normal training patches
    ann = masked(grid, 4)[0]
    feat = work.patch_features([ann.item])[0]
    idx = work.fitted().memory.annotated_patches_[ann.item.hash]
    logits = state["grid"].classifier.logit(feat.reshape(-1, feat.shape[-1]))
    normal = work.patch_features(work.fitted().normal_items[:2])[0]
    normal_logits = state["grid"].classifier.logit(normal.reshape(-1, feat.shape[-1]))
    assert np.median(logits[idx]) > np.quantile(normal_logits, 0.99)


def test_one_annotation_cannot_be_validated_so_the_score_stays_knn(fitted, tmp_path):
    """With a single annotated image nothing is left to hold out: both weights stay 0 (the kNN score)."""
    model, dss, store = fitted
    model.save(tmp_path / "m")
    work = DMAD.load(tmp_path / "m", store)
    items = items_of(dss[0])
    before = work.predict(items, progress_bar=False)
    work.update(masked(dss[0], 1))
    st = work.fitted().scorer.classes_[dss[0].name]
    assert st.classifier is not None and (st.image_weight, st.map_weight) == (0.0, 0.0)
    for a, b in zip(before, work.predict(items, progress_bar=False), strict=True):
        assert np.array_equal(a.patch_scores, b.patch_scores) and a.image_score == b.image_score


def test_a_saved_classifier_model_predicts_the_same(fitted, tmp_path):
    model, dss, store = fitted
    model.save(tmp_path / "start")
    work = DMAD.load(tmp_path / "start", store)
    work.update(masked(dss[0], 3) + [DefectAnnotation(items_of(dss[1], 1)[0], None)])  # one without a mask
    work.save(tmp_path / "m")
    assert not (tmp_path / "m" / "net.pt").exists() and (tmp_path / "m" / "classifiers.npz").exists()
    loaded = DMAD.load(tmp_path / "m", store)
    items = items_of(dss[0]) + items_of(dss[1])
    for a, b in zip(work.predict(items, progress_bar=False), loaded.predict(items, progress_bar=False), strict=True):
        assert np.array_equal(a.patch_scores, b.patch_scores) and a.image_score == b.image_score
    saved, back = work.fitted(), loaded.fitted()
    assert back.scorer.selection_ == saved.scorer.selection_
    # validation image scores per class, sorted: what Label Studio's 0-1 score is a percentile of
    assert back.validation_scores == saved.validation_scores and set(saved.validation_scores) == {"grid", "dots"}
    scores = saved.validation_scores["grid"]
    assert scores == sorted(scores) and normal_percentile(scores[-1] + 1, scores) == 1.0
    assert normal_percentile(scores[0], scores) == 0.0 and normal_percentile(1.0, []) is None
    assert back.memory.abnormal_bank_.part_sizes()[banks.WEAK] == work.config.bank.weak_patches_per_image


def test_ties_go_to_the_smallest_weight_and_scales_are_robust():
    assert _best({0.0: 0.5, 1.0: 0.5, 2.0: 0.49}, [0.0, 1.0, 2.0]) == 0.0
    assert _best({0.0: 0.5, 1.0: 0.7, 2.0: 0.7}, [0.0, 1.0, 2.0]) == 1.0
    scorer = DefectClassifierScorer(ClassifierConfig(weights=(0.0, 1.0, 2.0)), top_k=5)
    # held-out criteria (image rank with top-5, patch AUROC, image rank with the max) per w
    crit = {0.0: [(0.50, 0.90, 0.60)] * 3 + [(0.52, 0.92, 0.62)],
            1.0: [(0.80, 0.95, 0.70), (0.70, 0.96, 0.70), (0.90, 0.94, 0.70), (0.60, 0.97, 0.70)],
            2.0: [(0.85, 0.80, 0.70), (0.75, 0.81, 0.70), (0.95, 0.79, 0.70), (0.65, 0.80, 0.70)]}
    assert scorer._choose_image(crit) == (1.0, 5)  # 2.0 is best, but 1.0 lies within one standard error
    assert scorer._choose_map(crit) == 1.0
    # every held-out image's map is a little better at w = 1, but the images differ widely in difficulty:
    # the one-SE rule keeps the map at w = 0 (the kNN map), the paired rule (the map's default) takes w = 1
    steady = {0.0: [(0.5, a, 0.5) for a in (0.60, 0.90, 0.70, 0.95)],
              1.0: [(0.5, a + 0.02, 0.5) for a in (0.60, 0.90, 0.70, 0.95)]}
    paired = DefectClassifierScorer(ClassifierConfig(weights=(0.0, 1.0)), top_k=5)
    assert paired.config.map_selection == "paired_standard_error" and paired._choose_map(steady) == 1.0
    one_se = DefectClassifierScorer(ClassifierConfig(weights=(0.0, 1.0), map_selection="one_standard_error"), top_k=5)
    assert one_se._choose_map(steady) == 0.0
    scorer.config = dataclasses.replace(scorer.config, selection="best")
    assert scorer._choose_image(crit) == (2.0, 5)
    crit[1.0] = [(0.5, 0.9, 0.95)] * 4  # the maximum ranks the held-out images best
    assert scorer._choose_image({0.0: crit[0.0], 1.0: crit[1.0], 2.0: crit[0.0]}) == (1.0, 1)
    s = Scale.fit(np.r_[np.zeros(99), 100.0])
    assert s.median == 0 and np.isfinite(s.apply(np.array([1.0]))).all()
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(2, 1, (40, 8)), rng.normal(0, 1, (400, 8))
    clf = LinearPatchClassifier.fit(pos, neg, 1.0)
    assert clf.logit(pos).mean() > 0 > clf.logit(neg).mean()


def test_the_normal_bank_keeps_its_share_of_every_class():
    """One coreset over all classes gave the most varied class the budget; per class, each keeps 2 %."""
    rng = np.random.default_rng(0)
    dim, n = 16, 32 * 32
    items = [ImageItem(category="calm", hash=f"c{i:02d}") for i in range(6)] + \
            [ImageItem(category="busy", hash=f"b{i:02d}") for i in range(6)]
    feats = [rng.normal(0, 0.1, (32, 32, dim)).astype(np.float32) for _ in range(6)] + \
            [rng.normal(0, 5.0, (32, 32, dim)).astype(np.float32) for _ in range(6)]
    memory = DualMemory(BankConfig(index="flat"), dim, seed=0)
    memory.build(items, feats, [])
    cats = memory.normal_bank_.parts[banks.NORMAL].categories
    assert (cats == "calm").sum() == coreset_size(6 * n, 0.02) == (cats == "busy").sum()
    one = DualMemory(dataclasses.replace(BankConfig(index="flat"), coreset_per_class=False), dim, seed=0)
    one.build(items, feats, [])
    assert (one.normal_bank_.parts[banks.NORMAL].categories == "calm").sum() < coreset_size(6 * n, 0.02) / 4


def test_a_thin_crack_gives_the_patches_along_it():
    """A crack 2 px wide never covers half a 8 px patch; the patches it runs through are its defect."""
    mask = np.zeros((256, 256), bool)
    mask[40:200, 101:103] = True
    memory = DualMemory(BankConfig(), 4, seed=0)
    idx, weak = memory.annotated_patches(DefectAnnotation(ImageItem(category="c", hash="h"), mask),
                                         np.zeros((32, 32, 4), np.float32), None)
    rows, cols = np.divmod(idx, 32)
    assert not weak and set(cols.tolist()) == {12} and rows.min() == 5 and rows.max() == 24


def test_classifier_config_round_trips_through_a_saved_config():
    cfg = dataclasses.replace(DMADConfig.preset("offline"), classifier=ClassifierConfig(weights=(0.0, 3.0)))
    assert DMADConfig.from_dict(cfg.to_dict()) == cfg
    legacy = cfg.to_dict()
    del legacy["score"]["scorer"], legacy["classifier"]  # a model saved before the classifier scorer
    assert DMADConfig.from_dict(legacy).score.scorer == "mapper"


def test_a_class_gets_the_same_validation_split_alone_or_with_others():
    """The split is drawn per class: adding classes to the model must not change a class's training set
    (measured: it moved tire's kNN image AUROC by 2 points, which read as a unified-model penalty)."""
    from dmad_core.training import split_validation

    tire = [ImageItem(category="tire", hash=f"t{i:03d}") for i in range(40)]
    others = [ImageItem(category=c, hash=f"{c}{i:03d}") for c in ("bottle", "commutator") for i in range(30)]
    alone = split_validation(tire, 0.1, seed=3)
    together = split_validation(others + tire, 0.1, seed=3)
    assert [it for it in together[1] if it.category == "tire"] == alone[1] and len(alone[1]) == 4
    assert split_validation(tire, 0.1, seed=4)[1] != alone[1]  # the seed still matters


def test_patches_beside_a_drawn_defect_are_negatives_and_held_out_with_their_image(fitted, tmp_path):
    """``annotated_negatives``: the hottest patches of an annotated image outside its mask (and a one-patch
    ring) join the negatives; a defect without a mask gives none, and each leave-one-out fold leaves out
    the held-out image's own patches beside its defect as well as its defect."""
    model, dss, store = fitted
    grid, dots = dss
    anns = masked(grid, 3) + [DefectAnnotation(items_of(dots, 1)[0], None)]
    model.save(tmp_path / "start")
    work = DMAD.load(tmp_path / "start", store)
    work.update(anns)
    memory = work.fitted().memory
    feats = work.patch_features([a.item for a in anns])
    scorer = DefectClassifierScorer(dataclasses.replace(work.config.classifier, annotated_negatives=6), top_k=5)
    beside = scorer._beside_defects(memory, anns, feats)
    assert set(beside) == {"grid"}  # the dots defect has no mask
    rows, source = beside["grid"]
    assert sorted(set(source.tolist())) == [0, 1, 2] and all((source == j).sum() == 6 for j in range(3))
    for j, ann in enumerate(anns[:3]):
        f = feats[j]
        covered = np.zeros(f.shape[:2], bool)
        covered.flat[memory.annotated_patches_[ann.item.hash]] = True
        flat = f.reshape(-1, f.shape[-1])
        outside = np.flatnonzero(~binary_dilation(covered))
        d = memory.normal_distances(f, "grid")
        hottest = outside[np.argsort(-d[outside], kind="stable")[:6]]
        np.testing.assert_array_equal(rows[source == j], flat[hottest])
    # in the fold that holds image 0 out, its patches beside the defect are not negatives either
    seen = []
    original = LinearPatchClassifier.fit

    def spy(positives, negatives, regularisation):  # noqa: ANN001, ANN202
        seen.append(negatives)
        return original(positives, negatives, regularisation)

    normals = [ImageItem.from_path(r.path, "grid") for r in grid.train[:2]]
    reference = scorer._reference(memory, [], normals, work.patch_features)
    try:
        LinearPatchClassifier.fit = staticmethod(spy)  # type: ignore[method-assign]
        scorer._leave_one_out(memory, Scale(0.0, 1.0), scorer._positives(memory, anns, feats)["grid"], rows[:0], reference,
                              anns, feats, beside["grid"])
    finally:
        LinearPatchClassifier.fit = original  # type: ignore[method-assign]
    assert [len(n) for n in seen] == [12, 12, 12]
    assert not any((seen[0][:, None, :] == rows[source == 0][None]).all(-1).any(0))


def test_each_annotated_image_keeps_its_held_out_map_for_the_pre_annotation_levels(fitted, tmp_path):
    """``held_out_maps_``: per annotated image of a class with two or more, its patch scores at the class's map
    weight from a classifier fitted without it, which is what the pre-annotation's levels are chosen on
    (the final classifier has seen its patches). Recomputed here from that fold's classifier."""
    from dmad_core.defect_classifier import LinearPatchClassifier

    model, dss, store = fitted
    grid, dots = dss
    anns = masked(grid, 3) + masked(dots, 1)  # dots: one annotation, nothing to hold out
    model.save(tmp_path / "start")
    work = DMAD.load(tmp_path / "start", store)
    work.update(anns)
    scorer, memory = work.fitted().scorer, work.fitted().memory
    assert set(scorer.held_out_maps_) == {a.item.hash for a in anns[:3]}
    feats = work.patch_features([a.item for a in anns])
    state = scorer.classes_["grid"]
    pos, source = scorer._positives(memory, anns, feats)["grid"]
    rng = class_rng(work.config.classifier.seed, "grid")
    rows = rng.permutation([i for i, it in enumerate(work.fitted().normal_items) if it.category == "grid"])
    train = work.fitted().normal_items
    n_neg = min(work.config.classifier.negative_images, max(1, len(rows) // 2))
    negatives = scorer._negatives(memory, [train[i] for i in rows[:n_neg]], work.patch_features, rng)
    reference = scorer._reference(memory, [it for it in work.fitted().validation_items if it.category == "grid"],
                                  [train[i] for i in rows[n_neg:n_neg + work.config.classifier.reference_images]],
                                  work.patch_features)
    clf = LinearPatchClassifier.fit(pos[source != 0], negatives, work.config.classifier.regularisation)
    lscale = Scale.fit(np.concatenate([clf.logit(f) for f in reference.feats]))
    q = feats[0].reshape(-1, memory.dim)
    expected = (state.distance_scale.apply(memory.normal_distances(feats[0], "grid"))
                + state.map_weight * lscale.apply(clf.logit(q))).reshape(feats[0].shape[:-1])
    np.testing.assert_allclose(scorer.held_out_maps_[anns[0].item.hash], expected, rtol=1e-5, atol=1e-5)
    own = work.predict([anns[0].item], progress_bar=False)[0].patch_scores
    assert own.shape == expected.shape
    if state.map_weight > 0:  # the final classifier has seen this image's patches: its own map differs
        assert not np.allclose(own, expected)
