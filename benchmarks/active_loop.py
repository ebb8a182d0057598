"""Active learning, measured: the product's real loop replayed with a simulated inspector.

    .venv/bin/python benchmarks/active_loop.py [--data DIR ...] [--strategies random top default]
        [--seeds 0 1 2] [--minutes 10] [--batch 20] [--defect-rate 0.1] [--mask-seconds 30]
        [--normal-seconds 3] [--no-normals-arm] [--cache DIR] [--json OUT.json] [--plot OUT.png]
        [--write docs/results.md]

Setup: a home with its database; each class's test images split once and for all into a fixed evaluation
split (by content hash, stratified by class and label: the same images for every seed and strategy, never
offered) and the rest. The pool has a line's mix, not a test set's: its defect rate is ``--defect-rate``
(0.1), its normals are the remaining test goods plus training normals held back from the normal bank
(``--holdback``, also chosen by content hash), its defects a seeded sample of the remaining test defects
(the others stay in the home but are never offered). Pool images are ingested without their ground truth
(the inspector's answer key stays in this script); the evaluation split is ingested with role
``evaluation``, which every version's training evaluates (``evaluation_max_per_label`` is raised to hold
all of it). The first version is trained once, as `dmad train` does (its normal bank does not depend on the
seed); each strategy and seed then starts from a copy of that home.

Rounds: the inspector takes the next ``--batch`` images that the strategy offers: the Review page's own
function, ``app/services/loop/review_queue.py: offer``. A defective image gets its ground-truth mask as a drawn
mask, a good one is marked normal, both through ``record_annotation`` (which queues the retrain, as the
webhook does); each costs inspector seconds (30 a mask, 3 a normal). The real worker then runs the queued
jobs (``run_worker(once=True)``: the warm-started retrain, then the pool's re-ranking chunks). The inspector
budget is ``--minutes`` per class (the whole budget is minutes x classes, spent in the strategy's order).

Recorded after each round (``--json``): inspector minutes so far per class, defects found, false alarms
shown (offered good images that the version offering them called NG at the class's threshold in force), the
round's own offered / false alarms, per class image AUROC / pixel AUROC / PRO of the new version on the
evaluation split (as `dmad eval` writes them, 0-1), the version, and the wall time of the retrain and of
the re-ranking. ``--no-normals-arm`` adds ``default-no-normals``: the default strategy with an inspector
whose "normal" verdicts are not recorded (the images are skipped), to measure what confirmed normals buy:
the false alarms among the next rounds' offered images, with and without them.

Nothing is written to the working directory; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_DATA = [SHARED / "mvtec_3d_ad" / "tire", SHARED / "mvtec_ad" / "bottle", SHARED / "kolektorsdd" / "commutator"]
METRICS = ("image_auroc", "pixel_auroc", "pro")
NO_NORMALS = "default-no-normals"
CEILING = "every defect first (the ceiling of any order)"
BEGIN, END = "<!-- active-loop:begin -->", "<!-- active-loop:end -->"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LoopSettings:
    """One benchmark run's settings (the command line's)."""

    data: tuple[Path, ...]
    strategies: tuple[str, ...] = ("random", "top", "default")
    seeds: tuple[int, ...] = (0, 1, 2)
    minutes: float = 10.0  # inspector budget per class
    batch: int = 20
    defect_rate: float = 0.1
    holdback: float = 0.5  # share of each class's training normals held back from the bank for the pool
    eval_share: float = 0.5  # share of each class's test images (per label) in the evaluation split
    mask_seconds: float = 30.0
    normal_seconds: float = 3.0
    preset: str = "offline"
    train_epochs: int | None = None
    retrain_epochs: int | None = None
    cache: Path | None = None
    no_normals_arm: bool = False


@dataclass(frozen=True)
class Truth:
    """The inspector's answer key for one pool image (never stored in the database)."""

    category: str
    label: int
    mask_path: Path | None


@dataclass
class Split:
    """Which files are training normals, pool and evaluation, and which pool images a seed offers."""

    train: list[tuple[str, Path]] = field(default_factory=list)  # (class, path)
    pool: dict[str, tuple[Path, Truth]] = field(default_factory=dict)  # content hash -> (path, truth)
    evaluation: list[tuple[str, object]] = field(default_factory=list)  # (class, ImageRecord)
    hidden: dict[int, set[str]] = field(default_factory=dict)  # seed -> pool defects (hashes) it never offers


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def by_hash_share(paths: Sequence[Path], share: float) -> set[Path]:
    """The first ``share`` of ``paths`` by content hash: a fixed choice, the same for every seed."""
    return set(sorted(paths, key=file_hash)[:round(share * len(paths))])


def evaluation_split(records: Sequence, share: float) -> set[Path]:
    """The fixed evaluation split of one class's test records: per label, the first ``share`` by content
    hash. Independent of any seed, so every strategy and seed is measured on the same images."""
    return set().union(*(by_hash_share([r.path for r in records if r.label == label], share) for label in (0, 1)))


def make_split(datasets: Sequence, settings: LoopSettings) -> Split:
    """The pool (a line's mix) around the fixed evaluation split. The training normals held back and the
    evaluation split are fixed by content hash, so one first version serves every seed; a seed draws which
    of the remaining test defects its pool holds (the others stay hidden: never offered)."""
    split = Split()
    defects: dict[str, list[str]] = {}
    normals_of: dict[str, int] = {}
    for ds in datasets:
        held_eval = evaluation_split(ds.test, settings.eval_share)
        split.evaluation += [(ds.name, r) for r in ds.test if r.path in held_eval]
        rest = [r for r in ds.test if r.path not in held_eval]
        train = [r.path for r in ds.train if r.label == 0]
        held_back = by_hash_share(train, settings.holdback)
        split.train += [(ds.name, p) for p in sorted(train) if p not in held_back]
        normals = sorted(held_back) + [r.path for r in rest if r.label == 0]
        normals_of[ds.name] = len(normals)
        for p in normals:
            split.pool[file_hash(p)] = (p, Truth(ds.name, 0, None))
        for r in rest:
            if r.label == 1:
                split.pool[file_hash(r.path)] = (r.path, Truth(ds.name, 1, r.mask_path))
                defects.setdefault(ds.name, []).append(file_hash(r.path))
    for seed in settings.seeds:
        rng, hidden = random.Random(seed), set()
        for name, hashes in defects.items():
            n = min(len(hashes), round(settings.defect_rate / (1 - settings.defect_rate) * normals_of[name]))
            hidden |= set(hashes) - set(rng.sample(sorted(hashes), n))
        split.hidden[seed] = hidden
    return split


# -- homes ----------------------------------------------------------------------------------------------
def base_home(root: Path, datasets: Sequence, split: Split, settings: LoopSettings):  # noqa: ANN201
    """A home with the seed's split ingested and its first version trained and the pool ranked."""
    from app.home_folder import Home
    from app.services.database import open_database
    from app.worker import rerank_now, train_in_foreground
    from db.engine import write_transaction
    from db.repositories import add_image

    home = Home.at(root)
    home.create()
    home.save_settings(dataclasses.replace(
        home.load_settings(), preset=settings.preset, train_epochs=settings.train_epochs,
        retrain_epochs=settings.retrain_epochs, evaluation_max_per_label=100_000, feature_cache_max_bytes=None,
        line_pool_max_images=None))
    if settings.cache is not None:
        settings.cache.mkdir(parents=True, exist_ok=True)
        home.features_dir.rmdir()
        home.features_dir.symlink_to(settings.cache.resolve(), target_is_directory=True)
    sessions = open_database(home, create=True)
    with sessions() as session, write_transaction(session):
        for category, path in split.train:
            add_image(session, category, path, "train_normal")
        for path, truth in split.pool.values():
            add_image(session, truth.category, path, "pool")  # no ground truth: the inspector has it
        for category, r in split.evaluation:
            add_image(session, category, r.path, "evaluation", gt_label=r.label, gt_mask_path=r.mask_path,
                      defect_type=r.defect_type)
    ok, job = train_in_foreground(home, sessions)
    if not ok:
        raise RuntimeError(f"the first training failed: {job.error}")
    rerank_now(home, sessions)
    return home


def copy_home(src, dest: Path):  # noqa: ANN001, ANN201
    """A copy of a SQLite home (its feature cache shared: a symlink stays a symlink)."""
    from app.home_folder import Home

    shutil.copytree(src.root, dest, symlinks=True)
    with sqlite3.connect(dest / "dmad.db") as db:
        db.execute("UPDATE model_versions SET folder = replace(folder, ?, ?)", (str(src.root), str(dest)))
    return Home.at(dest)


# -- one strategy ---------------------------------------------------------------------------------------
def version_metrics(session, version_id: int) -> dict[str, dict[str, float | None]]:  # noqa: ANN001
    from db.repositories import metric_history

    out: dict[str, dict[str, float | None]] = {}
    for row in metric_history(session):
        if row.version_id == version_id and row.name in METRICS:
            out.setdefault(row.category, {})[row.name] = row.value
    return out


def run_strategy(home, split: Split, settings: LoopSettings, strategy: str, seed: int,  # noqa: ANN001
                 n_classes: int) -> list[dict]:
    """The rounds of one strategy from a trained home; one record per round (round 0: before any label)."""
    from PIL import Image as PILImage
    from sqlalchemy import select

    from app.services.loop import review_queue
    from app.services.loop.annotations import record_annotation
    from app.services.database import open_database
    from app.services.line.decisions import class_thresholds
    from app.services.read.read_models import active_version_info
    from app.services.read.ui_queries import ReviewFilter
    from app.worker import WorkerOptions, run_worker
    from db.models import ModelVersion

    sessions = open_database(home)
    record_normals = strategy != NO_NORMALS
    order = "default" if strategy == NO_NORMALS else strategy
    budget = settings.minutes * 60.0 * n_classes
    spent, found, false_alarms, skipped = 0.0, 0, 0, []
    with sessions() as session:  # the pool defects this seed leaves out of the line's mix: never offered
        from db.models import Image

        hidden = list(session.scalars(select(Image.id).where(Image.content_hash.in_(split.hidden[seed]),
                                                              Image.role == "pool")))
    rounds: list[dict] = []
    with sessions() as session:
        active = active_version_info(session)
        rounds.append({"minutes": 0.0, "found": 0, "false_alarms": 0, "offered": 0, "round_false_alarms": 0,
                       "version": active.name, "retrain_s": None, "rerank_s": None,
                       "per_class": version_metrics(session, active.id)})
    while spent < budget:
        with sessions() as session:
            active = active_version_info(session)
            flt = ReviewFilter(active.id, exclude=(*hidden, *skipped))
            offered = review_queue.offer(session, home, flt, limit=settings.batch, strategy=order, seed=seed)
            thresholds = {c: t.threshold for c, t in
                          class_thresholds(session, session.get(ModelVersion, active.id)).items()}
        if not offered:
            break
        shown = round_fa = 0
        with sessions() as session:
            for item in offered:
                if spent >= budget:
                    break
                row = item.image
                path, truth = split.pool[_hash_of(session, row.image_id)]
                shown += 1
                if truth.label == 1:
                    mask = np.asarray(PILImage.open(truth.mask_path).convert("L")) > 0 if truth.mask_path else None
                    record_annotation(session, home, image=row.image_id, kind="defect_mask", mask=mask, source="cli")
                    spent += settings.mask_seconds
                    found += 1
                else:
                    if row.score >= thresholds.get(row.category, float("inf")):
                        round_fa += 1
                    if record_normals:
                        record_annotation(session, home, image=row.image_id, kind="normal", source="cli")
                    else:
                        skipped.append(row.image_id)
                    spent += settings.normal_seconds
        false_alarms += round_fa
        options = WorkerOptions(once=True, sync_every_seconds=None, job_types=("retrain",))
        t0 = time.perf_counter()
        run_worker(home, sessions, options)
        retrain_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_worker(home, sessions, dataclasses.replace(options, job_types=("rerank",)))
        rerank_s = time.perf_counter() - t0
        with sessions() as session:
            active = active_version_info(session)
            rounds.append({"minutes": spent / 60.0 / n_classes, "found": found, "false_alarms": false_alarms,
                           "offered": shown, "round_false_alarms": round_fa,
                           "next_false_alarms": next_false_alarms(session, home, split, active.id,
                                                                  (*hidden, *skipped), settings.batch, order, seed),
                           "version": active.name, "retrain_s": round(retrain_s, 2), "rerank_s": round(rerank_s, 2),
                           "per_class": version_metrics(session, active.id)})
        last = rounds[-1]
        say(f"    {strategy} seed {seed}: {last['minutes']:.1f} min, {found} found, {false_alarms} false alarms, "
            f"{last['version']}, image AUROC {100 * mean_metric(last, 'image_auroc'):.1f}, "
            f"retrain {retrain_s:.1f} s, re-rank {rerank_s:.1f} s")
    return rounds


def next_false_alarms(session, home, split: Split, version_id: int, exclude: tuple[int, ...], batch: int,  # noqa: ANN001
                      order: str, seed: int) -> int:
    """Good images among the next ``batch`` the strategy would offer under the new version that the version
    calls NG: what a confirmed normal should pull down (issue 21, "confirmed normals must pay too")."""
    from app.services.loop import review_queue
    from app.services.line.decisions import class_thresholds
    from app.services.read.ui_queries import ReviewFilter
    from db.models import ModelVersion

    thresholds = {c: t.threshold for c, t in class_thresholds(session, session.get(ModelVersion, version_id)).items()}
    offered = review_queue.offer(session, home, ReviewFilter(version_id, exclude=exclude), limit=batch,
                                 strategy=order, seed=seed)
    return sum(split.pool[_hash_of(session, o.image.image_id)][1].label == 0
               and o.image.score >= thresholds.get(o.image.category, float("inf")) for o in offered)


def _hash_of(session, image_id: int) -> str:  # noqa: ANN001
    from db.models import Image

    return session.get(Image, image_id).content_hash


def mean_metric(record: dict, metric: str) -> float:
    values = [m.get(metric) for m in record["per_class"].values()]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


# -- the whole run ----------------------------------------------------------------------------------------
def run(settings: LoopSettings, work: Path, json_out: Path | None = None, base: Path | None = None) -> dict:
    """Every strategy and seed; the ``--json`` document (written to ``json_out`` after each strategy's run,
    so that a run cut short keeps what it measured). ``base``: a home this function trained before for the
    same data and settings (its first version is reused, not trained again)."""
    from dmad_core.data.readers import read_category

    datasets = [read_category(d) for d in settings.data]
    strategies = [*settings.strategies, *([NO_NORMALS] if settings.no_normals_arm else [])]
    out: dict = {"strategies": {s: {} for s in strategies}, "pool": {}, "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()
        if k not in ("data", "cache")}, "classes": [ds.name for ds in datasets], "seconds": {}}
    t_all = time.perf_counter()
    split = make_split(datasets, settings)
    t0 = time.perf_counter()
    if base is None:
        base_dir = base_home(work / "base", datasets, split, settings)
        out["seconds"]["first_training"] = round(time.perf_counter() - t0, 1)
    else:
        from app.home_folder import Home

        base_dir = Home.at(base)
    for seed in settings.seeds:
        offered = {h: v for h, v in split.pool.items() if h not in split.hidden[seed]}
        out["pool"][str(seed)] = {ds.name: {"pool": sum(t.category == ds.name for _, t in offered.values()),
                                            "pool_defects": sum(t.category == ds.name and t.label == 1
                                                                for _, t in offered.values()),
                                            "train": sum(c == ds.name for c, _ in split.train),
                                            "evaluation": sum(c == ds.name for c, _ in split.evaluation)}
                                  for ds in datasets}
        say(f"seed {seed}: pool {out['pool'][str(seed)]}")
        for strategy in strategies:
            t0 = time.perf_counter()
            home = copy_home(base_dir, work / f"seed{seed}-{strategy}")
            out["strategies"][strategy][str(seed)] = run_strategy(home, split, settings, strategy, seed, len(datasets))
            out["seconds"][f"{strategy}_seed{seed}"] = round(time.perf_counter() - t0, 1)
            shutil.rmtree(home.root, ignore_errors=True)
            if json_out is not None:
                out["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
                json_out.write_text(json.dumps(out, indent=1))
    out["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    return out


# -- reading the results ----------------------------------------------------------------------------------
def at_minutes(rounds: list[dict], minutes: float) -> dict:
    """The state the inspector had reached at ``minutes`` (the last round that ended by then)."""
    reached = [r for r in rounds if r["minutes"] <= minutes + 1e-9]
    return reached[-1] if reached else rounds[0]


def at_budget(rounds: list[dict], minutes: float, settings: dict, n_classes: int) -> dict:
    """The state when the inspector's budget of ``minutes`` ran out: the last round that ended by then, or
    past it by at most the one image during which it ran out (the loop stops after that image, so its
    round is the budget's last: ``at_minutes`` alone would drop it and compare a strategy whose last image
    was a mask at its round before)."""
    return at_minutes(rounds, minutes + max(settings["mask_seconds"], settings["normal_seconds"]) / 60.0 / n_classes)


def on_curve(rounds: list[dict], m: float, result: dict) -> dict:
    """A learning curve's state at minute ``m``: ``at_minutes``, and at the budget itself ``at_budget``."""
    minutes = result["settings"]["minutes"]
    if m >= minutes - 1e-9:
        return at_budget(rounds, minutes, result["settings"], len(result["classes"]))
    return at_minutes(rounds, m)


def found_per_minute(record: dict, n_classes: int) -> float:
    """Defects found per inspector minute (all classes' minutes) at a round's record."""
    return record["found"] / (record["minutes"] * n_classes) if record["minutes"] else 0.0


def summary(result: dict, minutes: float) -> dict[str, dict[str, float]]:
    """Per strategy, means over seeds at ``minutes``: image AUROC, pixel AUROC, PRO (0-1), defects found,
    found per inspector minute, false alarms shown, and the false alarms among offered images after the
    first round."""
    out, n_classes = {}, len(result["classes"])
    for strategy, seeds in result["strategies"].items():
        rows = [at_budget(rounds, minutes, result["settings"], n_classes) for rounds in seeds.values()]
        out[strategy] = {
            **{m: float(np.mean([mean_metric(r, m) for r in rows])) for m in METRICS},
            "found": float(np.mean([r["found"] for r in rows])),
            "found_per_minute": float(np.mean([found_per_minute(r, n_classes) for r in rows])),
            "false_alarms": float(np.mean([r["false_alarms"] for r in rows])),
            "next_false_alarms": float(np.mean([r.get("next_false_alarms", float("nan")) for r in rows])),
            "minutes": float(np.mean([r["minutes"] for r in rows])),
        }
    return out


def ceiling_rounds(pool: dict[str, dict[str, int]], settings: dict) -> list[dict]:
    """The rounds of an inspector shown every pool defect first (an oracle order), with the benchmark's own
    accounting: rounds of ``batch`` images, ``mask_seconds`` a defect, ``normal_seconds`` a normal, the
    budget shared by the classes. No order can find more defects by any minute, so this is the ceiling of
    "defects found per inspector minute" that the pool's composition allows.

    Args:
        pool: ``{class: {"pool": images, "pool_defects": defects, ...}}`` as ``run`` records it per seed.
        settings: the run's settings (``minutes``, ``batch``, ``mask_seconds``, ``normal_seconds``).

    Returns:
        One record per round, ``{"minutes": per class so far, "found": defects so far}``, round 0 first.

    Example:
        >>> ceiling_rounds({"a": {"pool": 10, "pool_defects": 2}}, {"minutes": 2, "batch": 5,
        ...                "mask_seconds": 30, "normal_seconds": 3})
        [{'minutes': 0.0, 'found': 0}, {'minutes': 1.15, 'found': 2}, {'minutes': 1.4, 'found': 2}]
    """
    n_classes = len(pool)
    defects = sum(v["pool_defects"] for v in pool.values())
    is_defect = [True] * defects + [False] * (sum(v["pool"] for v in pool.values()) - defects)
    budget = settings["minutes"] * 60.0 * n_classes
    rounds, spent, found, shown = [{"minutes": 0.0, "found": 0}], 0.0, 0, 0
    while spent < budget and shown < len(is_defect):
        for defect in is_defect[shown:shown + settings["batch"]]:
            if spent >= budget:
                break
            spent += settings["mask_seconds"] if defect else settings["normal_seconds"]
            found += defect
            shown += 1
        rounds.append({"minutes": round(spent / 60.0 / n_classes, 4), "found": found})
    return rounds


def ceiling(result: dict, minutes: float) -> dict[str, float]:
    """The oracle order's defects found and found per inspector minute at ``minutes``, means over the
    seeds' pools (``ceiling_rounds``). Not compared over the budget: its first round holds every defect,
    so at the rounds' granularity its curve rises late, though no order finds more by any minute."""
    n_classes = len(result["classes"])
    at = [at_budget(ceiling_rounds(pool, result["settings"]), minutes, result["settings"], n_classes)
          for pool in result["pool"].values()]
    return {"found": float(np.mean([r["found"] for r in at])),
            "found_per_minute": float(np.mean([found_per_minute(r, n_classes) for r in at]))}


def table(result: dict, minutes: float) -> list[str]:
    s = summary(result, minutes)
    base = s.get("random")
    lines = ["| strategy | minutes / class | image AUROC | pixel AUROC | PRO | defects found | found / inspector "
             "minute | x random | false alarms shown | false alarms in the next batch offered |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def versus_random(per_minute: float) -> str:
        return f"x{per_minute / base['found_per_minute']:.2f}" if base and base["found_per_minute"] else "-"

    for name, v in s.items():
        ratio = versus_random(v["found_per_minute"])
        share = "-" if np.isnan(v["next_false_alarms"]) else f"{v['next_false_alarms']:.1f}"
        lines.append(f"| {name} | {v['minutes']:.1f} | {100 * v['image_auroc']:.1f} | {100 * v['pixel_auroc']:.1f} | "
                     f"{100 * v['pro']:.1f} | {v['found']:.1f} | {v['found_per_minute']:.2f} | {ratio} | "
                     f"{v['false_alarms']:.1f} | {share} |")
    if result.get("pool"):
        top = ceiling(result, minutes)
        lines.append(f"| {CEILING} | - | - | - | - | {top['found']:.1f} | {top['found_per_minute']:.2f} | "
                     f"{versus_random(top['found_per_minute'])} | - | - |")
    return lines


def curve_area_table(result: dict, minutes: float, points: int = 101) -> list[str]:
    """Per strategy, the mean over seeds of each learning curve's mean height on [0, ``minutes``]."""
    grid = np.linspace(0, minutes, points)
    lines = ["| strategy | mean image AUROC over the budget | mean PRO over the budget | mean defects found over the budget |",
             "|---|---|---|---|"]
    for name, seeds in result["strategies"].items():
        def area(value) -> float:  # noqa: ANN001
            return float(np.mean([[value(on_curve(rounds, m, result)) for m in grid] for rounds in seeds.values()]))
        lines.append(f"| {name} | {100 * area(lambda r: mean_metric(r, 'image_auroc')):.1f} | "
                     f"{100 * area(lambda r: mean_metric(r, 'pro')):.1f} | {area(lambda r: r['found']):.1f} |")
    return lines


def per_class_table(result: dict, minutes: float) -> list[str]:
    classes = result["classes"]
    lines = ["| strategy | " + " | ".join(f"{c} I / PRO" for c in classes) + " |", "|---|" + "---|" * len(classes)]
    for strategy, seeds in result["strategies"].items():
        rows = [at_budget(rounds, minutes, result["settings"], len(classes)) for rounds in seeds.values()]
        cells = []
        for c in classes:
            vals = [[r["per_class"].get(c, {}).get(m) for r in rows] for m in ("image_auroc", "pro")]
            cells.append(" / ".join(f"{100 * np.mean([x for x in v if x is not None]):.1f}"
                                    if any(x is not None for x in v) else "-" for v in vals))
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines


def first_version(result: dict) -> str:
    """The mean metrics of round 0 (every strategy starts from the same first version)."""
    first = [rounds[0] for seeds in result["strategies"].values() for rounds in seeds.values()]
    return ", ".join(f"{m.replace('_', ' ')} {100 * np.mean([mean_metric(r, m) for r in first]):.1f}" for m in METRICS)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = result["settings"]["minutes"]
    grid = np.linspace(0, minutes, 41)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for strategy, seeds in result["strategies"].items():
        if len(seeds) == 1:  # one seed: each round's state at the minutes it ended
            rounds = next(iter(seeds.values()))
            x = [r["minutes"] for r in rounds]
            axes[0].plot(x, [100 * mean_metric(r, "image_auroc") for r in rounds], marker="o", label=strategy)
            axes[1].plot(x, [r["found"] for r in rounds], marker="o", label=strategy)
            continue
        auroc = np.mean([[mean_metric(on_curve(r, m, result), "image_auroc") for m in grid] for r in seeds.values()],
                        axis=0)
        found = np.mean([[on_curve(r, m, result)["found"] for m in grid] for r in seeds.values()], axis=0)
        axes[0].step(grid, 100 * auroc, where="post", label=strategy)
        axes[1].step(grid, found, where="post", label=strategy)
    axes[0].set(xlabel="inspector minutes per class", ylabel="mean image AUROC (%), evaluation split",
                title="model quality")
    axes[1].set(xlabel="inspector minutes per class", ylabel="defects found (all classes)", title="defects found")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{', '.join(result['classes'])}: mean over {len(next(iter(result['strategies'].values())))} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(result: dict) -> str:
    minutes = result["settings"]["minutes"]
    seeds = " ".join(next(iter(result["strategies"].values())).keys())
    pools = result["pool"][next(iter(result["pool"]))]
    lines = [f"Measured {time.strftime('%Y-%m-%d')} with `benchmarks/active_loop.py --seeds {seeds} --minutes {minutes:g}"
             f" --batch {result['settings']['batch']}` ({', '.join(result['classes'])}); means over the seeds, at "
             f"{minutes:g} inspector minutes per class (the round during which the budget ran out). Pool per class (seed {next(iter(result['pool']))}): "
             + ", ".join(f"{c} {v['pool']} images ({v['pool_defects']} defects), {v['train']} training normals, "
                         f"{v['evaluation']} evaluation" for c, v in pools.items()) + ".",
             "", *table(result, minutes), "",
             "Over the whole budget (the area under each learning curve: the mean of the state reached at every "
             "minute from 0 to the budget, so a strategy's early rounds count as much as its last; rounds are "
             f"{result['settings']['batch']} images, so a single cut-off compares rounds of different sizes):",
             "", *curve_area_table(result, minutes), "", f"Before any label (the first version): {first_version(result)}.", "",
             "Per class at the full budget (image AUROC / PRO, %):", "", *per_class_table(result, minutes)]
    rounds = [r for seeds in result["strategies"].values() for rs in seeds.values() for r in rs[1:]]
    if rounds:
        lines += ["", f"Per round: retrain {np.mean([r['retrain_s'] for r in rounds]):.1f} s and re-ranking "
                      f"{np.mean([r['rerank_s'] for r in rounds]):.1f} s on average (wall); whole "
                      f"benchmark {result['seconds']['total'] / 60:.1f} min."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    from dmad_core.config import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA, metavar="DIR")
    ap.add_argument("--strategies", nargs="+", default=["random", "top", "default"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--minutes", type=float, default=10.0, help="inspector budget per class")
    ap.add_argument("--batch", type=int, default=20, help="images the inspector takes per round")
    ap.add_argument("--defect-rate", type=float, default=0.1)
    ap.add_argument("--holdback", type=float, default=0.5, help="share of training normals held back for the pool")
    ap.add_argument("--eval-share", type=float, default=0.5, help="share of test images in the evaluation split")
    ap.add_argument("--mask-seconds", type=float, default=30.0)
    ap.add_argument("--normal-seconds", type=float, default=3.0)
    ap.add_argument("--preset", choices=PRESETS, default="offline")
    ap.add_argument("--train-epochs", type=int, default=None)
    ap.add_argument("--retrain-epochs", type=int, default=None)
    ap.add_argument("--no-normals-arm", action="store_true",
                    help="also run the default order with the inspector's normals not recorded")
    ap.add_argument("--cache", type=Path, help="feature cache shared by every home (default: each home's own)")
    ap.add_argument("--json", type=Path, metavar="OUT.json")
    ap.add_argument("--plot", type=Path, metavar="OUT.png")
    ap.add_argument("--write", type=Path, metavar="FILE.md", help="put the tables into this file (between markers)")
    ap.add_argument("--base", type=Path, metavar="HOME",
                    help="start every strategy from this home, trained by an earlier run with the same data and settings")
    ap.add_argument("--from-json", type=Path, metavar="IN.json",
                    help="no run: the tables and the picture of a run's --json (one cut short keeps its seeds)")
    args = ap.parse_args(argv)
    missing = [d for d in args.data if not d.is_dir()]
    if missing:
        sys.exit(f"active_loop.py: no such folder: {', '.join(map(str, missing))} (the shared data lives in ../shared/data)")
    from app.services.loop.review_queue import STRATEGIES

    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        sys.exit(f"active_loop.py: unknown strategy {', '.join(unknown)}; one of {', '.join(STRATEGIES)}")
    settings = LoopSettings(tuple(args.data), tuple(args.strategies), tuple(args.seeds), args.minutes, args.batch,
                            args.defect_rate, args.holdback, args.eval_share, args.mask_seconds, args.normal_seconds,
                            args.preset, args.train_epochs, args.retrain_epochs, args.cache, args.no_normals_arm)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        complete = [s for s in result["strategies"].values() if s]
        keep = set.intersection(*(set(s) for s in complete)) if complete else set()
        result["strategies"] = {n: {k: v for k, v in s.items() if k in keep} for n, s in result["strategies"].items() if s}
    else:
        with tempfile.TemporaryDirectory(prefix="dmad-active-loop-") as tmp:
            result = run(settings, Path(tmp), args.json, args.base)
    text = report(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    if args.write:
        try:
            from benchmarks.quality import write_between
        except ImportError:  # run as a script: benchmarks/ is the first folder on the path
            from quality import write_between
        write_between(args.write, text, BEGIN, END,
                      "## Active learning against a simulated inspector (`benchmarks/active_loop.py`)")
    return result


if __name__ == "__main__":
    main()
