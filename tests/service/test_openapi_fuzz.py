"""Schemathesis over the OpenAPI schema: whatever a client sends, never a 5xx.

The app runs in embedded mode on a fresh jobs folder; random bodies cannot be
valid images, so nothing heavy runs. Examples are bounded per operation. The
operations are driven with plain hypothesis (schemathesis' lazy pytest loader
does not work with this pytest), one strategy per operation.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from disa.service.app import create_app  # noqa: E402

from .helpers import API_KEY, api_key_env, service_env, using_env  # noqa: E402

MAX_EXAMPLES = 20


def test_no_operation_answers_5xx(tmp_path):
    from schemathesis.python import asgi

    env = {**service_env(tmp_path / "jobs", max_upload_bytes=200_000, sweep_interval_s=3600),
           **api_key_env()}
    with using_env(env):
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app())
        try:
            operations = [result.ok() for result in schema.get_all_operations()]
            assert len(operations) >= 7
            for operation in operations:
                _fuzz(operation)
        finally:
            asgi.shutdown_lifespans()  # the app's embedded worker and sweeper


def _fuzz(operation) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        response = case.call(headers={"X-API-Key": API_KEY})
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path}: {response.status_code} "
            f"{response.text[:300]}")
        # Every check but positive data acceptance: schema-valid bytes are not images,
        # so the API rightly answers 422 to them.
        case.validate_response(response, headers={"X-API-Key": API_KEY},
                               excluded_checks=[positive_data_acceptance])

    run()
