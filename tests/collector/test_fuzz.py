"""Property-based fuzzing of the collector's HTTP API from its own OpenAPI document: no input gets a 5xx."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

import schemathesis  # noqa: E402 - a test dependency: `make test` installs it

from collector.api import create_app  # noqa: E402
from collector.settings import Settings  # noqa: E402

INGEST, READ = "fuzz-ingest", "fuzz-read"


def make_app(tmp_dir):
    app = create_app(Settings(data_dir=tmp_dir, ingest_tokens=frozenset({INGEST}), read_tokens=frozenset({READ})))
    app.state.store.open()  # the ASGI calls below run no lifespan, which would open it in the background
    return app


import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_DATA = tempfile.mkdtemp(prefix="fleetscope-fuzz-")
atexit.register(shutil.rmtree, _DATA, ignore_errors=True)
_APP = make_app(_DATA)
# 17 endpoints x 60 examples take about a minute: out of the quick loop, in `make test`.
pytestmark = pytest.mark.slow

schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_server_error(case):
    token = INGEST if case.path == "/v1/ingest" else READ
    for headers in ({"Authorization": f"Bearer {token}"}, {}, {"Authorization": "Bearer wrong"}):
        response = case.call(headers=headers)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
