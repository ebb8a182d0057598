"""The home folder: every file the product writes lives under it (never the working directory).

Layout::

    <home>/dmad.db            SQLite database (default; PostgreSQL by URL instead)
    <home>/settings.json      what `dmad init` chose (database URL, preset, ports)
    <home>/features/          feature cache (float16, memory-mapped), shared by all model versions
    <home>/models/<version>/  immutable model versions, written to a temporary name then renamed
    <home>/masks/             annotation masks as PNG, named by annotation id
    <home>/uploads/           images uploaded through the UI to be scored
    <home>/images/            the line's images (`dmad serve`, `dmad predict --ingest`), by content hash
    <home>/spool/             `dmad serve`'s scored batches not yet in the pool (app/services/line/spool.py)
    <home>/labelstudio/       Label Studio's own data folder
    <home>/secrets/           API token and webhook secret, mode 0600
    <home>/logs/              logs of processes started by `dmad up` / `dmad labelstudio start`
    <home>/run/               pid files of running processes
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import pydantic
from pydantic import ConfigDict, Field

from annotation.secret_files import read_secret, write_secret
from dmad_core.config import PRESETS, Scorer
from dmad_core.errors import Invalid

DEFAULT_HOME = Path("dmad-home")


Port = Annotated[int, Field(ge=1, le=65535)]
Positive = Annotated[int, Field(ge=1)]
Label = Annotated[str, Field(min_length=1)]


# A pydantic dataclass: every way one is built (settings.json, `dmad init`, dataclasses.replace, tests) is
# validated, so a reader can trust each field; unknown keys are refused (a misspelt setting would otherwise
# be silently ignored).
@pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class HomeSettings:
    """What `dmad init` stores in settings.json, checked when it is built (``Home.load_settings`` turns a
    bad file into an error that names the file and the key)."""

    db_url: str | None = None  # None: SQLite file <home>/dmad.db
    preset: str = "offline"  # one of dmad_core.config.PRESETS
    # "classifier" (kNN distance + per-class defect classifiers, the default) or "mapper": the paper's loop,
    # the abnormal bank rebuilt from seen features and anomaly-centre perturbations and the score mapper
    # retrained on every annotation (square images: the mapper batches whole images of one grid).
    scorer: Scorer = "classifier"
    weights_path: str | None = None
    label_studio_port: Port = 8080
    webhook_port: Port = 8765
    streamlit_port: Port = 8501
    defect_labels: Annotated[tuple[Label, ...], Field(min_length=1)] = ("defect",)
    label_studio_project: Label = "DMAD inspection"  # this home's project title in Label Studio
    outliers_dir: str | None = None  # DTD-like textures for the abnormal bank; None: procedural textures
    train_epochs: Positive | None = None  # mapper epochs of a training from scratch; None: the preset's
    retrain_epochs: Positive | None = None  # mapper epochs of a warm-started retrain; None: an eighth of those
    # OK/NG: share of a class's validation normals a new version may call NG
    false_alarm_rate: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.01
    # normal training images held out per class (thresholds); None: the preset's
    validation_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    line_pool_max_images: Positive | None = 100_000  # the line's images kept in the pool (oldest go first); None: all
    # the feature cache's budget (app/services/cache_budget.py); None: no budget
    feature_cache_max_bytes: Annotated[int, Field(ge=0)] | None = 20 * 1024**3
    # Factory scale (docs/scaling.md): a retrain evaluates on at most this many images per class and
    # ground-truth label (chosen by content hash, the same set for every version), then promotes; the pool
    # is re-ranked after, in chunks of `rerank_chunk_images` that any number of workers share.
    evaluation_max_per_label: Positive = 250
    rerank_chunk_images: Positive = 256
    pool_score_versions_kept: Positive = 3  # versions whose pool scores are kept: the active one and the newest others
    # disk space `dmad serve` holds in reserve (a file in its spool folder) and lets go when the disk fills, so the
    # line is still answered while someone frees space (app/services/line/spool.py); 0: none
    spool_reserve_bytes: Annotated[int, Field(ge=0)] = 64 * 1024**2

    @pydantic.field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        return preset

    @staticmethod
    def from_json(text: str, source: str = "settings") -> HomeSettings:
        """Settings from settings.json's text; Invalid naming ``source`` and every bad key otherwise.

        Args:
            text: the file's JSON (an object of the fields above; absent keys take their defaults).
            source: what to name in the error (the file's path).

        Returns:
            The validated settings.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Invalid(f"{source} is not valid JSON ({exc}): fix it or run `dmad init` again") from exc
        if not isinstance(raw, dict):
            raise Invalid(f"{source} must hold a JSON object of settings, not {type(raw).__name__}")
        try:
            return HomeSettings(**raw)
        except pydantic.ValidationError as exc:
            raise Invalid(f"{source}: {describe_errors(exc)}") from exc


def describe_errors(exc: pydantic.ValidationError) -> str:
    """One line per bad key: ``key: what is wrong (got value)``; unknown keys are named as such."""
    parts = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "settings"
        if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            parts.append(f"{key}: unknown setting")
        else:
            parts.append(f"{key}: {error['msg']} (got {error['input']!r})")
    return "; ".join(parts)


@dataclass(frozen=True)
class Home:
    root: Path

    @staticmethod
    def at(path: str | os.PathLike[str] | None) -> Home:
        return Home(Path(path or DEFAULT_HOME).expanduser().resolve())

    @property
    def db_path(self) -> Path:
        return self.root / "dmad.db"

    @property
    def settings_path(self) -> Path:
        return self.root / "settings.json"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def masks_dir(self) -> Path:
        return self.root / "masks"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def spool_dir(self) -> Path:
        return self.root / "spool"

    @property
    def labelstudio_dir(self) -> Path:
        return self.root / "labelstudio"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def create(self) -> None:
        for d in (self.root, self.features_dir, self.models_dir, self.masks_dir, self.uploads_dir,
                  self.labelstudio_dir, self.logs_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)

    def db_url(self) -> str:
        s = self.load_settings()
        return s.db_url or f"sqlite:///{self.db_path}"

    def load_settings(self) -> HomeSettings:
        """The home's settings, validated (defaults where there is no settings.json); Invalid naming the file
        and the bad key when it holds a value no reader could use."""
        if not self.settings_path.exists():
            return HomeSettings()
        return HomeSettings.from_json(self.settings_path.read_text(), str(self.settings_path))

    def save_settings(self, settings: HomeSettings) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.settings_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(settings), indent=2))
        tmp.replace(self.settings_path)

    def write_secret(self, name: str, value: str) -> Path:
        """Secrets are written 0600 from the first byte (see :mod:`annotation.secret_files`)."""
        return write_secret(self.secrets_dir, name, value)

    def read_secret(self, name: str) -> str | None:
        return read_secret(self.secrets_dir, name)
