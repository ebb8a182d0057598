"""The home folder: every file the product writes lives under it (never the working directory).

Layout::

    <home>/dmad.db            SQLite database (default; PostgreSQL by URL instead)
    <home>/settings.json      what `dmad init` chose (database URL, preset, ports)
    <home>/features/          feature cache (float16, memory-mapped), shared by all model versions
    <home>/models/<version>/  immutable model versions, written to a temporary name then renamed
    <home>/masks/             annotation masks as PNG, named by annotation id
    <home>/uploads/           images uploaded through the UI to be scored
    <home>/images/            the line's images (`dmad serve`, `dmad predict --ingest`), by content hash
    <home>/spool/             `dmad serve`'s scored batches not yet in the pool (app/services/spool.py)
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

from annotation.secret_files import read_secret, write_secret

DEFAULT_HOME = Path("dmad-home")


@dataclass(frozen=True)
class HomeSettings:
    """What `dmad init` stores in settings.json."""

    db_url: str | None = None  # None: SQLite file <home>/dmad.db
    preset: str = "offline"
    weights_path: str | None = None
    label_studio_port: int = 8080
    webhook_port: int = 8765
    streamlit_port: int = 8501
    defect_labels: tuple[str, ...] = ("defect",)
    label_studio_project: str = "DMAD inspection"  # this home's project title in Label Studio
    outliers_dir: str | None = None  # DTD-like textures for the abnormal bank; None: procedural textures
    train_epochs: int | None = None  # mapper epochs of a training from scratch; None: the preset's
    retrain_epochs: int | None = None  # mapper epochs of a warm-started retrain; None: an eighth of those
    false_alarm_rate: float = 0.01  # OK/NG: share of a class's validation normals a new version may call NG
    line_pool_max_images: int | None = 100_000  # the line's images kept in the pool (oldest go first); None: all
    feature_cache_max_bytes: int | None = 20 * 1024**3  # the feature cache's budget (app/services/cache_budget.py)
    # Factory scale (docs/scaling.md): a retrain evaluates on at most this many images per class and
    # ground-truth label (chosen by content hash, the same set for every version), then promotes; the pool
    # is re-ranked after, in chunks of `rerank_chunk_images` that any number of workers share.
    evaluation_max_per_label: int = 250
    rerank_chunk_images: int = 256
    pool_score_versions_kept: int = 3  # versions whose pool scores are kept: the active one and the newest others


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
        if not self.settings_path.exists():
            return HomeSettings()
        raw = json.loads(self.settings_path.read_text())
        if "defect_labels" in raw:
            raw["defect_labels"] = tuple(raw["defect_labels"])
        return HomeSettings(**raw)

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
