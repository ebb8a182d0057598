"""Unit tests of the engine's parts on synthetic data: coreset, banks and their parts, mask filtering,
knowledge, loss, feature cache, self-match exclusion, save/load, weights resolution."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dmad_core import banks
from dmad_core.backbone import FeatureExtractor, WeightsUnavailableError, load_backbone
from dmad_core.cache import FeatureCache, content_hash
from dmad_core.config import BackboneConfig, BankConfig, DMADConfig, MapperConfig
from dmad_core.coreset import coreset_size, greedy_coreset
from dmad_core.data import load_image, load_mask, make_outlier_textures, make_synthetic_category, read_category
from dmad_core.metrics import compute_class_metrics
from dmad_core.model import DMAD, DefectAnnotation, FeatureStore, ImageItem, top_k_mean
from dmad_core.modules import DMADNet, KnowledgeEnhancer, hinge_loss, smooth_maps
from dmad_core.training import MapperTrainer


# ------------------------------------------------------------------------------------------- coreset
def test_coreset_covers_every_cluster():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 50, size=(8, 16))
    sizes = [500, 500, 500, 500, 500, 500, 500, 3]  # one rare pattern: random sampling would likely miss it
    x = np.concatenate([c + rng.normal(0, 0.1, size=(n, 16)) for c, n in zip(centres, sizes)]).astype(np.float32)
    sel = greedy_coreset(x, 8, projection_dim=0)
    labels = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    assert sorted(set(labels[sel])) == list(range(8))
    assert len(set(sel.tolist())) == 8


def test_coreset_continues_from_existing_centres():
    rng = np.random.default_rng(1)
    old = rng.normal(0, 1, size=(200, 8)).astype(np.float32)
    new = np.concatenate([old[:50] + 0.01, rng.normal(20, 1, size=(5, 8))]).astype(np.float32)
    sel = greedy_coreset(new, 1, projection_dim=0, initial=old)
    assert sel[0] >= 50  # the far-away new pattern, not a near-duplicate of the bank


def test_coreset_candidate_cap_and_size():
    x = np.random.default_rng(2).normal(size=(5000, 8)).astype(np.float32)
    sel = greedy_coreset(x, 100, max_candidates=1000)
    assert len(sel) == 100 and sel.max() < 5000 and len(set(sel.tolist())) == 100
    assert coreset_size(1000, 0.02) == 20 and coreset_size(10, 0.02) == 1


# --------------------------------------------------------------------------------------------- banks
def _part(vectors, source, cat="a"):
    v = np.asarray(vectors, np.float32)
    return banks.BankPart(v, np.full(len(v), source, np.int64), np.full(len(v), cat))


@pytest.mark.parametrize("index,exact_max", [("flat", 0), ("hnsw", 0), ("flat", 100)], ids=["faiss-flat", "faiss-hnsw", "exact"])
def test_bank_search_excludes_own_image(index, exact_max):
    bank = banks.MemoryBank(dim=2)
    bank.set_part(banks.NORMAL, banks.BankPart.concat([_part([[0, 0], [0.1, 0]], 7), _part([[5, 5]], 9)], 2))
    bank.build_index(BankConfig(index=index, exact_search_max=exact_max))
    d, i = bank.search(np.array([[0, 0]], np.float32))
    assert i[0] == 0 and d[0] == 0
    d, i = bank.search(np.array([[0, 0]], np.float32), exclude_sources=np.array([7]))
    assert i[0] == 2 and d[0] == pytest.approx(50.0)  # the other image's entry, not its own


def test_exact_search_matches_faiss_flat_and_beats_hnsw_recall():
    """Plain queries on a small bank go through the exact matrix-product search: same neighbours and
    distances as faiss's exact flat index (where the faiss HNSW index may miss some)."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 24)).astype(np.float32)
    vectors = rng.normal(size=(3000, 8)).astype(np.float32) @ basis + 0.2 * rng.normal(size=(3000, 24)).astype(np.float32)
    queries = rng.normal(size=(2500, 8)).astype(np.float32) @ basis + 0.2 * rng.normal(size=(2500, 24)).astype(np.float32)
    reference = banks.MemoryBank(dim=24)
    reference.set_part(banks.NORMAL, _part(vectors, 1))
    reference.build_index(BankConfig(index="flat", exact_search_max=0))  # faiss IndexFlatL2 answers
    d_ref, i_ref = reference.search(queries)
    bank = banks.MemoryBank(dim=24)
    bank.set_part(banks.NORMAL, _part(vectors, 1))
    bank.build_index(BankConfig(index="hnsw", exact_search_max=10_000))
    d, i = bank.search(queries)
    assert bank._exact is not None  # the exact path answered, not the HNSW index
    assert np.array_equal(i, i_ref)
    assert np.allclose(d, d_ref, rtol=1e-4, atol=1e-4)
    # excluding each query's own image: the best entry of another image, exactly as a brute-force search
    mixed = banks.MemoryBank(dim=24)
    mixed.set_part(banks.NORMAL, banks.BankPart(vectors, np.arange(3000) % 7, np.full(3000, "a")))
    mixed.build_index(BankConfig(index="hnsw", exact_search_max=10_000))
    own = np.arange(2500) % 7
    d, i = mixed.search(queries, exclude_sources=own)
    brute = (queries.astype(np.float64) ** 2).sum(1)[:, None] - 2.0 * queries.astype(np.float64) @ vectors.T.astype(np.float64) \
        + (vectors.astype(np.float64) ** 2).sum(1)[None, :]
    brute[own[:, None] == (np.arange(3000) % 7)[None, :]] = np.inf
    assert np.array_equal(i, brute.argmin(1)) and not np.any(i % 7 == own)
    assert np.allclose(d, brute.min(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index,exact_max", [("hnsw", 10_000), ("hnsw", 0), ("flat", 0)],
                         ids=["exact", "faiss-hnsw-filtered", "faiss-flat-filtered"])
def test_class_aware_search_stays_within_the_class(index, exact_max, tmp_path):
    """A query of a known class gets the nearest entry *of its class*, even when another class's entry is
    nearer; self-matches stay excluded; an unknown class searches the whole bank; saved and loaded alike."""
    rng = np.random.default_rng(3)
    a = rng.normal(0, 1, size=(3000, 8)).astype(np.float32)
    b = a[:40] + 0.01  # class b: near-copies of some class-a entries
    bank = banks.MemoryBank(dim=8)
    bank.set_part(banks.NORMAL, banks.BankPart(np.concatenate([a, b]), np.r_[np.arange(3000) % 5, np.full(40, 9)],
                                       np.r_[np.full(3000, "a"), np.full(40, "b")]))
    bank.build_index(BankConfig(index=index, exact_search_max=exact_max))
    q = b[:10] + 0.001
    _, anywhere = bank.search(q)
    assert np.all(anywhere >= 3000)  # the class-b copies are the nearest entries overall
    d, i = bank.search(q, category="a")
    brute = ((q[:, None, :] - a[None]) ** 2).sum(-1)
    assert np.array_equal(i, brute.argmin(1)) and np.allclose(d, brute.min(1), rtol=1e-4, atol=1e-5)
    own = i % 5
    _, i_x = bank.search(q, exclude_sources=own, category="a")
    brute[own[:, None] == (np.arange(3000) % 5)[None, :]] = np.inf
    assert np.array_equal(i_x, brute.argmin(1)) and np.all(i_x < 3000)
    assert np.array_equal(bank.search(q, category="unknown")[1], anywhere)
    bank.save(tmp_path, "normal")
    loaded = banks.MemoryBank.load(tmp_path, "normal", BankConfig(index=index, exact_search_max=exact_max))
    assert np.array_equal(loaded.search(q, category="a")[1], i)


def test_bank_parts_provenance_and_persistence(tmp_path):
    bank = banks.MemoryBank(dim=3)
    bank.set_part(banks.OUTLIER, _part(np.eye(3), 1, "tire"))
    bank.set_part(banks.SEEN, _part([[9, 9, 9]], 2, "bottle"))
    bank.set_part(banks.CENTRE, _part([[8, 8, 8]], -1, "bottle"))
    with pytest.raises(RuntimeError):
        bank.search(np.zeros((1, 3), np.float32))  # index must be built explicitly, once
    bank.build_index(BankConfig(index="flat"))
    _, i = bank.search(np.array([[9, 9, 8.9]], np.float32))
    assert bank.part_names_of(i)[0] == banks.SEEN and bank.union_.categories[i[0]] == "bottle"
    bank.save(tmp_path, "abnormal")
    assert (tmp_path / "abnormal.faiss").exists()
    loaded = banks.MemoryBank.load(tmp_path, "abnormal", BankConfig(index="flat"))
    assert loaded.part_sizes() == {banks.OUTLIER: 3, banks.SEEN: 1, banks.CENTRE: 1}
    assert np.array_equal(loaded.search(np.array([[9, 9, 8.9]], np.float32))[1], i)
    with pytest.raises(ValueError):
        bank.set_part(banks.WEAK, _part(np.zeros((1, 4)), 3))


# ------------------------------------------------------------------------------------- modules/loss
def test_hinge_loss_hand_computed():
    n = torch.tensor([0.5, 0.0])  # second normal patch is inside the margin: loss 0.5
    p = torch.tensor([-0.5, 0.5])  # second pseudo patch is on the wrong side: loss 1.0
    a = torch.tensor([0.0])  # annotated at 0: loss 0.5
    assert float(hinge_loss(n, p, None, 0.5, 1.0, 0.0)) == pytest.approx(0.25 + 0.5)
    assert float(hinge_loss(n, p, a, 0.5, 0.5, 15.0)) == pytest.approx(0.25 + 0.25 + 7.5)


def test_knowledge_distance_mode_is_residual_only():
    torch.manual_seed(0)
    enh = KnowledgeEnhancer(4, 2, use_attention=False)
    q, nn_n, nn_a = torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    o = enh(q, nn_n, nn_a, q)
    assert o.shape == (1, 3, 12)
    assert torch.allclose(o[..., 4:8], enh.projection(q - nn_n))
    enh.use_attention = True
    assert not torch.allclose(enh(q, nn_n, nn_a, q)[..., 4:8], enh.projection(q - nn_n))


def test_mapper_eval_mode_is_batch_independent():
    net = DMADNet(4, 2, 8, 4, True).eval()
    x = torch.randn(2, 5, 4)
    full = net(x, x, x, x)
    single = net(x[:1], x[:1], x[:1], x[:1])
    assert torch.allclose(full[:1], single, atol=1e-6)


@pytest.mark.parametrize("attention,extras", [(True, True), (False, True), (True, False)],
                         ids=["attention+prior", "distance+prior", "attention-plain"])
def test_inference_folds_the_projection_into_the_mapper_exactly(attention, extras):
    """Eval mode skips the projection (folded into the mapper's first layer): same scores as the unfolded
    path, for trained (non-trivial) weights in every knowledge mode."""
    torch.manual_seed(0)
    net = DMADNet(12, 4, 16, 4, attention, distance_features=extras, distance_prior=extras,
                  correction_bound=0.5 if extras else 0.0, key_pool=1)
    for p in net.parameters():  # a zero-initialised head would hide any error behind a constant
        torch.nn.init.normal_(p, std=0.3)
    q, nn_n, nn_a = torch.randn(3, 2, 9, 12).unbind(0)
    net.train()
    net(q, nn_n, nn_a, q)  # batch-norm running statistics away from their initial values
    net.eval()
    with torch.no_grad():
        mapper_unfolded = net.mapper(net.enhancer(q, nn_n, nn_a, q))
        mapper_folded = net.mapper(net.enhancer.unprojected(q, nn_n, nn_a, q), net.folded_input_layer())
        assert mapper_unfolded.std() > 0.1  # the mapper's own output, before any bound or prior
        assert torch.allclose(mapper_folded, mapper_unfolded, atol=1e-4, rtol=1e-4)
        assert torch.allclose(net(q, nn_n, nn_a, q), net.head(*net.represent(q, nn_n, nn_a, q)), atol=1e-4, rtol=1e-4)


def test_smoothing_preserves_mass_and_top_k():
    m = torch.zeros(1, 32, 32)
    m[0, 16, 16] = 1.0
    s = smooth_maps(m, 4.0)
    assert float(s.sum()) == pytest.approx(1.0, abs=1e-3) and float(s.max()) < 0.02
    assert top_k_mean(np.array([[1, 2], [3, 10]]), 2) == pytest.approx(6.5)


# ------------------------------------------------------------------------------------ cache/weights
def test_feature_cache_roundtrip_and_stats(tmp_path):
    cache = FeatureCache(tmp_path, "cfg")
    assert cache.get("ab" * 32) is None and cache.stats.misses == 1
    cache.put("ab" * 32, np.ones((2, 2, 3), np.float32))
    got = cache.get("ab" * 32)
    assert got.dtype == np.float16 and isinstance(got, np.memmap) and cache.stats.hits == 1
    assert not list(tmp_path.rglob("*.tmp.npy"))


def test_weights_resolution_is_explicit(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="three ways|--weights"):
        load_backbone(BackboneConfig(name="resnet18", weights="file", weights_path=str(tmp_path / "none.pth")))
    with pytest.raises(WeightsUnavailableError, match="test"):
        load_backbone(BackboneConfig(name="resnet18", weights="random"))
    with pytest.raises(WeightsUnavailableError, match="only provides efficientnet_lite0"):
        load_backbone(BackboneConfig(name="resnet18", weights="package"))
    model = load_backbone(BackboneConfig(name="resnet18", weights="random"), allow_random_weights=True)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = load_backbone(BackboneConfig(name="resnet18", weights="file", weights_path=str(tmp_path / "w.pth")))
    assert torch.equal(loaded.state_dict()["fc.weight"], model.state_dict()["fc.weight"])


def test_offline_backbone_has_genuine_imagenet_weights():
    """The packaged EfficientNet-Lite0 weights classify: a smooth image and its noise differ in output,
    and batch-norm running statistics are not the fresh-initialisation values (0 mean, 1 var)."""
    model = load_backbone(DMADConfig.preset("offline").backbone)
    bn = model.state_dict()["bn1.running_var"]
    assert not torch.allclose(bn, torch.ones_like(bn))
    fe = FeatureExtractor(DMADConfig.preset("offline").backbone)
    feats = fe(fe.preprocess([np.zeros((100, 140, 3), np.uint8)]))  # the preset keeps the aspect ratio
    assert feats.shape == (1, 32, 44, 152) and fe.grid_size == (32, 32)


# ------------------------------------------------------------------------------------ whole model
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    roots = [make_synthetic_category(tmp / "data", name, texture=tex, n_train=12, n_test_good=4, n_test_defect=6,
                                     seed=i) for i, (name, tex) in enumerate([("grid", "grid"), ("dots", "dots")])]
    cfg = DMADConfig.preset("offline")  # the mapper's tests: the classifier scorer's are in test_defect_classifier
    cfg = dataclasses.replace(cfg, mapper=dataclasses.replace(cfg.mapper, epochs=3, steps_per_epoch=4),
                              score=dataclasses.replace(cfg.score, scorer="mapper"),
                              backbone=dataclasses.replace(cfg.backbone, geometry="square"))
    store = FeatureStore(cfg, tmp / "features")
    dss = [read_category(r) for r in roots]
    normal = [ImageItem.from_path(r.path, d.name) for d in dss for r in d.train]
    outliers = [ImageItem.from_array(a, "outlier") for a in make_outlier_textures(6, 128)]
    model = DMAD(cfg, store).fit(normal, outliers)
    return model, dss, store, tmp


def test_fit_builds_banks_and_never_reruns_backbone(fitted):
    model, dss, store, _ = fitted
    state = model.fitted()
    assert state.memory.normal_bank_.part_sizes()[banks.NORMAL] > 0
    abnormal = state.memory.abnormal_bank_.part_sizes()
    assert abnormal[banks.OUTLIER] > 0 and abnormal[banks.SEEN] == 0
    assert len(state.validation_items) >= 2 and not ({i.hash for i in state.validation_items}
                                                     & {i.hash for i in state.normal_items})
    misses = store.cache.stats.misses
    model.predict([ImageItem.from_path(r.path, dss[0].name) for r in dss[0].train[:3]])
    assert store.cache.stats.misses == misses  # training images come from the cache
    assert state.pixel_threshold is not None
    assert not state.net.training


def test_filtered_seen_part_only_keeps_masked_patches(fitted):
    model, dss, _, _ = fitted
    ds = dss[0]
    rec = next(r for r in ds.test if r.label == 1)
    mask = load_mask(rec.mask_path)
    item = ImageItem.from_path(rec.path, ds.name)
    memory = model.fitted().memory
    idx, weak = memory.annotated_patches(DefectAnnotation(item, mask), model.patch_features([item])[0], model._net_scores)
    gh, gw = model.features.extractor.grid_size
    cover = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None],
                                                    (gh, gw)).reshape(-1).numpy()
    assert not weak and 0 < len(idx) < gh * gw // 10  # a defect is a small part of its image
    assert cover[idx].min() >= min(0.5, cover.max() / 2) and np.all(np.delete(cover, idx) < min(0.5, cover.max() / 2))
    idx_weak, weak = memory.annotated_patches(DefectAnnotation(item, None), model.patch_features([item])[0],
                                              model._net_scores)
    assert weak and len(idx_weak) == model.config.bank.weak_patches_per_image


def test_update_rebuilds_abnormal_parts_and_switches_to_semi(fitted, tmp_path):
    model, dss, store, _ = fitted
    ds = dss[0]
    defects = [r for r in ds.test if r.label == 1][:2]
    anns = [DefectAnnotation(ImageItem.from_path(r.path, ds.name), load_mask(r.mask_path)) for r in defects]
    weak = [DefectAnnotation(ImageItem.from_path(r.path, ds.name), None) for r in [r for r in ds.test if r.label][2:3]]
    state = model.fitted()  # update() retrains it in place
    before = state.memory.abnormal_bank_.part_sizes()[banks.OUTLIER]
    model.update(anns + weak, epochs=1)
    sizes = state.memory.abnormal_bank_.part_sizes()
    assert sizes[banks.OUTLIER] == before and sizes[banks.SEEN] > 0 and sizes[banks.WEAK] == 8
    assert sizes[banks.CENTRE] == model.config.bank.perturbations_per_centre  # one category has evidence
    assert state.mapper_config.lambda_annotated == 15.0 and state.mapper_config.knowledge == "distance"
    model.update([], epochs=1)  # deletions are honoured: the full set is passed each time
    assert state.memory.abnormal_bank_.part_sizes()[banks.SEEN] == 0
    model.save(tmp_path / "m")
    loaded = DMAD.load(tmp_path / "m", store)
    items = [ImageItem.from_path(r.path, ds.name) for r in ds.test]
    a = np.array([p.image_score for p in model.predict(items)])
    b = np.array([p.image_score for p in loaded.predict(items)])
    assert np.allclose(a, b, atol=1e-5) and not loaded.fitted().net.training


def test_normal_neighbours_are_cached_with_the_model_until_the_normal_bank_changes(fitted, tmp_path):
    model, dss, store, _ = fitted
    model.save(tmp_path / "m")
    loaded = DMAD.load(tmp_path / "m", store)
    state, dim = loaded.fitted(), loaded.config.backbone.feature_dim

    def fresh(item, exclude):
        q = loaded.patch_features([item])[0].reshape(-1, dim)
        src = np.full(len(q), item.source, np.int64) if exclude else None
        return state.memory.normal_bank_.search(q, src)[1]

    item = state.normal_items[0]
    cached = state.memory.normal_nn_cache_[f"{item.hash}:x"]  # saved with the model, read back with it
    assert len(cached) == 32 * 32 and np.array_equal(cached, fresh(item, True))
    assert f"{state.validation_items[0].hash}:a" in state.memory.normal_nn_cache_
    # a confirmed normal extends the normal bank: every cached neighbour is searched again
    extra = ImageItem.from_path(next(r for r in dss[0].test if r.label == 0).path, dss[0].name)
    before = state.memory.normal_bank_.part_sizes()[banks.NORMAL]
    loaded.update(list(state.annotations), [extra], epochs=1)
    assert state.memory.normal_bank_.part_sizes()[banks.NORMAL] > before
    assert f"{extra.hash}:x" in state.memory.normal_nn_cache_
    assert np.array_equal(state.memory.normal_nn_cache_[f"{item.hash}:x"], fresh(item, True))


def test_normal_bank_search_is_class_aware_in_the_model(fitted):
    """Every normal-bank neighbour of a training or test patch comes from its own class's entries, and the
    model with the switch off searches across classes (BankConfig.class_aware)."""
    model, dss, _, _ = fitted
    state = model.fitted()
    memory = state.memory
    cats = memory.normal_bank_.parts[banks.NORMAL].categories
    for it in state.normal_items[:6]:
        key = f"{it.hash}:x"
        assert key in memory.normal_nn_cache_ and np.all(cats[memory.normal_nn_cache_[key]] == it.category)
    items = [ImageItem.from_path(r.path, d.name) for d in dss for r in d.test[:2]]
    feats = model.patch_features(items)
    per_query = np.repeat([it.category for it in items], 32 * 32)
    q = np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats])
    _, i = memory.search_normal(q, None, per_query)
    assert np.all(cats[i] == per_query)
    off = dataclasses.replace(memory.config, class_aware=False)
    memory.config, saved = off, memory.config
    try:
        _, i_all = memory.search_normal(q, None, per_query)
    finally:
        memory.config = saved
    assert np.array_equal(i_all, memory.normal_bank_.search(q)[1])


def test_knn_baseline_separates_synthetic_defects(fitted):
    model, dss, _, _ = fitted
    for ds in dss:
        preds = model.knn_predict([ImageItem.from_path(r.path, ds.name) for r in ds.test])
        m = compute_class_metrics(np.array([r.label for r in ds.test]), np.array([p.image_score for p in preds]))
        assert m.image_auroc > 0.7, ds.name


def test_a_retrain_stops_once_validation_stops_improving_and_keeps_the_best_state(fitted, tmp_path, monkeypatch):
    """The validation losses are scripted (a double for the loss, not for the stopping rule under test): best
    after the first epoch, then two epochs without improvement -> a retrain with patience 2 stops after
    epoch 3 of 6, and the model keeps the weights it had after epoch 1."""
    model, _, store, _ = fitted
    model.save(tmp_path / "m")
    loaded = DMAD.load(tmp_path / "m", store)
    assert loaded.config.mapper.retrain_patience == 2
    losses = iter([1.0, 0.8, 0.9, 0.85, 0.7, 0.6, 0.5])  # start, then one per epoch
    states = []

    def scripted_loss(trainer, net, val, ann, rng, factor):
        states.append({k: v.clone() for k, v in net.state_dict().items()})
        return next(losses)

    monkeypatch.setattr(MapperTrainer, "validation_loss", scripted_loss)
    messages = []
    loaded.update(list(loaded.fitted().annotations), epochs=6, progress=lambda f, m: messages.append(m))
    state = loaded.fitted()
    assert [h["epoch"] for h in state.history] == [-1, 0, 1, 2]
    assert any("stopped after epoch 3/6" in m for m in messages)
    best = states[1]  # after epoch 1 (index 0 is the starting point)
    assert all(torch.equal(v, best[k]) for k, v in state.net.state_dict().items())
    assert not all(torch.equal(v, states[-1][k]) for k, v in state.net.state_dict().items())


def test_abnormal_neighbours_from_the_cached_outlier_part_equal_a_search_of_the_whole_bank(fitted, tmp_path):
    """A retrain reuses each training image's nearest outlier-part entries (saved with the model) and
    searches only the parts built from annotations; the result is the nearest entry of the whole bank,
    own-image entries excluded, exactly as a search of the whole bank finds it."""
    model, dss, store, _ = fitted
    ds = dss[0]
    defect = next(r for r in ds.test if r.label == 1)
    model.save(tmp_path / "m")
    loaded = DMAD.load(tmp_path / "m", store)
    state = loaded.fitted()
    item = state.normal_items[0]
    assert f"{item.hash}:x" in state.memory.outlier_nn_cache_  # saved with the model, read back with it
    annotated = ImageItem.from_path(defect.path, ds.name)
    loaded.update([DefectAnnotation(annotated, load_mask(defect.mask_path))], epochs=1)
    bank, dim = state.memory.abnormal_bank_, loaded.config.backbone.feature_dim
    assert bank.part_sizes()[banks.SEEN] > 0
    for it in (item, annotated):  # a normal training image, and the annotated image whose patches are "seen"
        q = loaded.patch_features([it])[0].reshape(-1, dim)
        src = np.full(len(q), it.source, np.int64)
        got = state.memory.abnormal_neighbours(f"{it.hash}:x", q, src)
        d_ref, i_ref = bank._exact_nearest(q, src)  # the whole union at once, own image masked out
        assert np.array_equal(got, i_ref)
        assert not np.any(bank.union_.sources[got] == it.source)  # never its own patches


def test_a_saved_and_loaded_model_predicts_the_same_and_keeps_its_annotations(fitted, tmp_path):
    """Save/load is lossless for prediction (bit for bit) and for what a retrain needs: the annotations come
    back with their masks (a defect without a mask stays without)."""
    model, dss, store, _ = fitted
    ds = dss[0]
    masked, unmasked = [r for r in ds.test if r.label == 1][:2]
    model.save(tmp_path / "start")
    work = DMAD.load(tmp_path / "start", store)  # the shared fixture stays as it is
    anns = [DefectAnnotation(ImageItem.from_path(masked.path, ds.name), load_mask(masked.mask_path)),
            DefectAnnotation(ImageItem.from_path(unmasked.path, ds.name), None)]
    work.update(anns, epochs=1)
    work.save(tmp_path / "m")
    loaded = DMAD.load(tmp_path / "m", store)
    items = [ImageItem.from_path(r.path, d.name) for d in dss for r in d.test]
    for a, b in zip(work.predict(items), loaded.predict(items), strict=True):
        assert np.array_equal(a.patch_scores, b.patch_scores) and a.image_score == b.image_score
    assert np.array_equal(work.anomaly_map(a.patch_scores, (40, 60)), loaded.anomaly_map(b.patch_scores, (40, 60)))
    saved, back = work.fitted(), loaded.fitted()
    assert [a.item for a in back.annotations] == [a.item for a in anns]
    assert np.array_equal(back.annotations[0].mask, anns[0].mask) and back.annotations[1].mask is None
    assert (back.pixel_threshold, back.image_threshold) == (saved.pixel_threshold, saved.image_threshold)
    assert back.mapper_config == saved.mapper_config and back.history == saved.history
    # the pre-annotation level chosen on the drawn mask (its class only) comes back too
    assert set(saved.mask_peak_shares) == {ds.name} and back.mask_peak_shares == saved.mask_peak_shares
    assert set(saved.mask_grabcut) <= {ds.name} and back.mask_grabcut == saved.mask_grabcut  # and GrabCut's choice
    # each class's pixel threshold is the quantile of its own validation normals' heat maps
    assert set(saved.pixel_thresholds) == {d.name for d in dss} and back.pixel_thresholds == saved.pixel_thresholds
    for d in dss:
        val = [it for it in saved.validation_items if it.category == d.name]
        maps = np.concatenate([work.anomaly_map(p.patch_scores).ravel() for p in work.predict(val, progress_bar=False)])
        assert saved.pixel_thresholds[d.name] == pytest.approx(
            float(np.quantile(maps, work.config.score.pixel_threshold_quantile)), rel=1e-6)


def test_predictions_do_not_depend_on_what_was_called_before(fitted):
    """Two predicts in a row, with other calls between them, give the same result bit for bit."""
    model, dss, _, _ = fitted
    items = [ImageItem.from_path(r.path, d.name) for d in dss for r in d.test[:4]]
    first = model.predict(items)
    model.knn_predict(items[:2])
    model.anomaly_map(first[0].patch_scores)
    second = model.predict(items)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.patch_scores, b.patch_scores) and a.image_score == b.image_score


def test_an_image_scores_the_same_on_first_sight_and_from_the_cache(fitted):
    """Images never seen (their features computed now) and the same images again (features from the cache):
    bit for bit the same scores. The backbone's features were a channels-last view, the cache's C order, and
    the mapper's products differed by 1e-6 between them: the line (first sight) and the pool (the cache)
    could disagree about a part at its threshold."""
    model, dss, _, _ = fitted
    arrays = [np.ascontiguousarray(load_image(r.path)[:, ::-1]) for r in dss[0].test[:5]]  # mirrored: new hashes
    items = [ImageItem.from_array(a, dss[0].name) for a in arrays]
    assert all(model.features.cache.get(it.hash) is None for it in items)  # never seen
    first, again = model.predict(items), model.predict(items)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.patch_scores, b.patch_scores) and a.image_score == b.image_score


def test_the_feature_cache_stays_under_its_budget_and_keeps_protected_and_recent_entries(tmp_path):
    """A run that writes three times the budget: after each eviction the cache fits it, no protected
    entry is ever removed, and the entries read most recently are the ones kept."""
    import os as _os

    cache = FeatureCache(tmp_path, "cfg")
    one = np.zeros((8, 8, 16), np.float16)
    cache.put("p" * 64, one)
    size = cache.path_for("p" * 64).stat().st_size
    budget = 10 * size
    protected = {"p" * 64}
    for i in range(30):
        key = f"{i:064d}"
        cache.put(key, one)
        _os.utime(cache.path_for(key), (1000 + i, 1000 + i))  # written in order
        if i % 5 == 4:
            cache.get(f"{i - 4:064d}")  # read again: recently used
            report = cache.evict(budget, protected)
            assert report.bytes_after <= budget and report.protected == 1
            assert "p" * 64 in cache and f"{i - 4:064d}" in cache
    assert sum(s for _, s, _ in cache.entries()) <= budget
    kept = {p.stem for _, _, p in cache.entries()}
    assert f"{29:064d}" in kept and f"{1:064d}" not in kept  # the newest written stays, the oldest never read goes
    report = cache.evict(0, protected)  # the protected entry alone stays, whatever the budget
    assert {p.stem for _, _, p in cache.entries()} == protected and report.bytes_after == size
