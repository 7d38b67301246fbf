"""Security headers on every answer, local API docs, and Allow headers naming every method."""

from __future__ import annotations

import re

import pytest

from disa.service.headers import API_POLICY

JOB = "0" * 32


@pytest.mark.parametrize("path", ["/", "/docs", "/v1/jobs", f"/v1/jobs/{JOB}", "/openapi.json",
                                  "/healthz", "/readyz", "/metrics", "/static/app.js",
                                  "/docs-assets/swagger-ui.css", "/no-such-page"])
def test_every_answer_carries_a_content_security_policy(client, path):
    r = client.get(path)
    policy = r.headers.get("content-security-policy")
    assert policy, f"{path}: no policy"
    assert "frame-ancestors 'none'" in policy and "base-uri 'none'" in policy
    assert r.headers["x-content-type-options"] == "nosniff"
    if path not in ("/", "/docs"):
        assert policy == API_POLICY


def test_the_api_docs_load_their_assets_from_this_server_only(client):
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "connect-src 'self';" in policy
    sources = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert sources and all(s.startswith("/") or s.startswith("data:") for s in sources), sources
    assert "<script>" not in r.text  # no inline script: the policy would block it
    for source in sources:
        if source.startswith("/"):
            assert client.get(source).status_code == 200, source
    assert client.get("/redoc").status_code == 404  # no page that would use a CDN


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", f"/v1/jobs/{JOB}", "GET, DELETE"),
    ("PATCH", "/v1/jobs", "GET, POST"),
    ("GET", f"/v1/jobs/{JOB}/cancel", "POST"),
    ("POST", f"/v1/jobs/{JOB}/viewer", "GET"),
    ("DELETE", "/healthz", "GET"),
])
def test_a_405_names_every_method_of_the_path(client, method, path, allowed):
    r = client.request(method, path)
    assert r.status_code == 405
    assert r.headers["allow"] == allowed
    assert r.json() == {"detail": f"method not allowed; allowed: {allowed}"}
