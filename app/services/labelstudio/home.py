"""The home's Label Studio: its server, its project and webhook, the receiver and the sync.

What `dmad labelstudio ...`, `dmad webhook`, the worker's periodic sync and the UI all use, so that each
knows one way to reach the project: the server is built from the home's folders, the project is the
home's own (its title is the `label_studio_project` setting, so several homes can share one Label
Studio), and every connection brings the project's config and webhook up to date.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import requests
from sqlalchemy.orm import Session, sessionmaker

from annotation.project import STATE_FILE, ensure_project, ensure_webhook, read_state
from annotation.server import LabelStudioServer, ServerPaths, ServerStatus
from annotation.sync import SyncReport, sync_annotations
from annotation.webhook import WebhookServer, make_webhook_server
from app.home_folder import Home
from app.services.labelstudio.sink import DatabaseSink
from dmad_core.errors import Unavailable

WEBHOOK_SECRET = "webhook_secret"
PIXEL_THRESHOLD_KEY = "pixel_threshold"  # in a model version's config: heat-map value that marks a defect
MASK_PEAK_SHARES_KEY = "mask_peak_shares"  # ... and per class with drawn masks, the share of an image's peak


def label_studio_server(home: Home, port: int | None = None, bin: str | None = None) -> LabelStudioServer:
    """The Label Studio of this home: its files under the home, its port the running one, else the
    home's `label_studio_port` setting (or `port` when given)."""
    paths = ServerPaths(data_dir=home.labelstudio_dir, run_dir=home.run_dir, logs_dir=home.logs_dir,
                        secrets_dir=home.secrets_dir, owner=str(home.root),
                        start_command=f"dmad labelstudio start --home {home.root}")
    return LabelStudioServer(paths, port=port, bin=bin, default_port=home.load_settings().label_studio_port)


def webhook_secret(home: Home) -> str:
    """The secret Label Studio sends in X-DMAD-Secret; created (0600) on first use."""
    secret = home.read_secret(WEBHOOK_SECRET)
    if not secret:
        secret = secrets.token_hex(20)
        home.write_secret(WEBHOOK_SECRET, secret)
    return secret


def webhook_base_url(home: Home) -> str:
    return f"http://127.0.0.1:{home.load_settings().webhook_port}"


def has_project(home: Home) -> bool:
    """Has this home ever created its Label Studio project (so a sync has something to pull)?"""
    return bool(read_state(home.labelstudio_dir / STATE_FILE).get("project_id"))


def _project(home: Home, server: LabelStudioServer) -> tuple[Any, int]:
    """(client, project id), with the project's config and webhook brought up to date."""
    if not server.healthy():
        raise Unavailable(f"Label Studio is not running at {server.url}; start it with "
                          f"`dmad labelstudio start --home {home.root}` (and `dmad webhook` so images show)")
    client = server.client()
    settings = home.load_settings()
    project_id = ensure_project(client, settings.label_studio_project, settings.defect_labels,
                                state_path=home.labelstudio_dir / STATE_FILE)
    ensure_webhook(client, project_id, f"{webhook_base_url(home)}/webhook", webhook_secret(home))
    return client, project_id


@dataclass(frozen=True)
class Connection:
    """A client on the home's Label Studio, its project, and the address inspectors open."""

    client: Any  # label_studio_sdk.LabelStudio
    project_id: int
    url: str


def connect(home: Home) -> Connection:
    """The home's project on its running Label Studio, with config and webhook brought up to date;
    an `Unavailable` error that says how to start it when it is not answering."""
    server = label_studio_server(home)
    client, project_id = _project(home, server)
    return Connection(client, project_id, server.url)


@dataclass(frozen=True)
class Started:
    status: ServerStatus
    project_id: int
    log: str


def start(home: Home, port: int | None = None, timeout: float = 180.0) -> Started:
    """Starts the home's Label Studio (detached; nothing when it already runs) and sets up the
    project and its webhook."""
    home.create()
    server = label_studio_server(home, port)
    status = server.start(timeout=timeout)
    _client, project_id = _project(home, server)
    return Started(status, project_id, str(server.log_path))


@dataclass(frozen=True)
class Health:
    """What `dmad labelstudio status` reports."""

    server: ServerStatus
    project_id: int | None
    webhook_url: str
    webhook_healthy: bool


def health(home: Home) -> Health:
    """Is the home's Label Studio running and answering, and does the webhook receiver answer?"""
    status = label_studio_server(home).status()
    receiver = webhook_base_url(home)
    try:
        receiver_ok = requests.get(f"{receiver}/health", timeout=2).status_code == 200
    except requests.RequestException:
        receiver_ok = False
    project_id = read_state(home.labelstudio_dir / STATE_FILE).get("project_id")
    return Health(status, project_id, receiver, receiver_ok)


def sync_project(home: Home, sessions: sessionmaker[Session]) -> tuple[SyncReport, int]:
    """Pulls every annotation of the home's project into the database (what webhooks missed);
    (report, project id)."""
    connection = connect(home)
    report = sync_annotations(connection.client, connection.project_id, DatabaseSink(home, sessions))
    return report, connection.project_id


def webhook_receiver(home: Home, sessions: sessionmaker[Session], host: str = "127.0.0.1",
                     port: int | None = None) -> WebhookServer:
    """The bound (not yet serving) receiver of the home's annotations, serving its images too."""
    port = port if port is not None else home.load_settings().webhook_port
    sink = DatabaseSink(home, sessions)
    return make_webhook_server(host, port, sink, webhook_secret(home), image_path=sink.image_path)
