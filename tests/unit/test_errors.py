"""Errors carry their meaning in their type, and each edge maps the type once: the CLI's exit code and
line, the webhook's HTTP status, the UI's Streamlit level."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from annotation.project import SECRET_HEADER
from annotation.sink import MemorySink
from annotation.webhook import make_webhook_server, serve_in_thread
from app.cli import exit_code
from app.cli import main as dmad
from app.services.loop.annotations import AnnotationError, InvalidAnnotation, UnknownAnnotationTarget
from app.services.loop.versions import VersionConflict, VersionError, VersionNotFound
from app.ui.context import error_level
from dmad_core.errors import Conflict, Invalid, NotFound, Unavailable, UserError, http_status

KINDS = (NotFound, Invalid, Conflict, Unavailable)


def test_every_kind_is_a_user_error_and_domain_errors_keep_their_kind() -> None:
    assert all(issubclass(kind, UserError) for kind in KINDS)
    assert issubclass(UnknownAnnotationTarget, AnnotationError) and issubclass(UnknownAnnotationTarget, NotFound)
    assert issubclass(InvalidAnnotation, AnnotationError) and issubclass(InvalidAnnotation, Invalid)
    assert issubclass(VersionNotFound, VersionError) and issubclass(VersionNotFound, NotFound)
    assert issubclass(VersionConflict, VersionError) and issubclass(VersionConflict, Conflict)


@pytest.mark.parametrize(("error", "status", "level"), [
    (NotFound("x"), 404, "warning"), (Invalid("x"), 422, "error"), (Conflict("x"), 409, "error"),
    (Unavailable("x"), 503, "error"), (UserError("x"), 422, "error"),
    (UnknownAnnotationTarget("x"), 404, "warning"), (VersionConflict("x"), 409, "error"),
])
def test_each_edge_maps_the_type(error: UserError, status: int, level: str) -> None:
    assert http_status(error) == status
    assert error_level(error) == level
    assert exit_code(error) == 2


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dmad(["status", "--home", str(tmp_path / "nowhere")]) == 2  # NotFound: no database
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmad: error: no database in")


class _RefusingSink(MemorySink):
    """A sink that refuses every annotation with a chosen error, as the database sink's services do."""

    def __init__(self, error: Exception) -> None:
        super().__init__({1: (4, 4)})
        self.error = error

    def record(self, **_: object) -> str:
        raise self.error


@pytest.mark.parametrize(("error", "status"), [
    (UnknownAnnotationTarget("image 1 is not in the database"), 404), (InvalidAnnotation("the mask is empty"), 422),
    (Conflict("busy"), 409), (Unavailable("down"), 503), (UserError("plain"), 422),
    (ValueError("mask is 3x3 but the image is 4x4"), 422),
])
def test_webhook_answers_the_status_of_the_type(error: Exception, status: int) -> None:
    server = make_webhook_server("127.0.0.1", 0, _RefusingSink(error), "s3cret")
    serve_in_thread(server)
    try:
        payload = {"action": "ANNOTATION_CREATED",
                   "annotation": {"id": 7, "result": [{"type": "choices", "from_name": "verdict",
                                                       "to_name": "image", "value": {"choices": ["normal"]}}],
                                  "updated_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat(), "task": 3},
                   "task": {"id": 3, "data": {"image_id": 1}}}
        response = requests.post(f"{server.url}/webhook", json=payload, headers={SECRET_HEADER: "s3cret"},
                                 timeout=5)
        assert response.status_code == status
        assert response.json() == {"error": str(error)}
    finally:
        server.shutdown()
        server.server_close()
