"""`dmad serve` under a schema-driven fuzz: schemathesis generates requests from the service's own OpenAPI
schema, valid and invalid ones (its positive and negative modes), for every operation; none may get a
5xx, and every answer must match the schema (status codes, content types, bodies). The token is sent, so
the fuzz reaches the scoring code and not only the 401."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.scoring import ServeConfig, create_app
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test extra: scripts/setup.sh installs it")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

TOKEN = "fuzz-token"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_and_every_answer_matches_the_schema(ui_home: PreparedHome, mode: GenerationMode) -> None:  # noqa: F811
    app = create_app(ui_home.home, ui_home.sessions(), ServeConfig(feed=False, max_upload_bytes=2_000_000), token=TOKEN)
    with TestClient(app):  # runs the lifespan: the model is loaded and the batcher started
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} == {"GET /v1/health", "GET /v1/version", "POST /v1/score"}
        seen: list[int] = []

        @given(case=st.one_of(*[op.as_strategy(generation_mode=mode) for op in operations]))
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case) -> None:
            response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
            seen.append(response.status_code)

        fuzz()
    assert seen and max(seen) < 500
    print(f"\n{mode.value}: {len(seen)} requests, statuses {sorted(set(seen))}")
