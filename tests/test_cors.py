"""CORS_ORIGINS: a page on another origin (a React app on localhost:3000) may call the API, and
only the listed origins may. Against the service under uvicorn, with the headers a browser
sends; the demo page served from another origin runs in tests/test_browser.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from scripts.pgcluster import Database
from tests.app_support import bearer, new_user, running_server, settings_for

APP = "http://localhost:3000"
OTHER = "https://evil.example"


@pytest.fixture
def url(db: Database) -> Iterator[str]:
    with running_server(settings_for(db, cors_origins=[APP, "https://app.example.com"])) as base:
        yield base


def preflight(url: str, origin: str, method: str = "POST", headers: str = "") -> httpx.Response:
    request_headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        request_headers["Access-Control-Request-Headers"] = headers
    return httpx.options(f"{url}/v1/checkout/sessions", headers=request_headers)


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def test_a_preflight_from_a_listed_origin_should_be_answered(url: str) -> None:
    response = preflight(url, APP, headers="authorization,content-type,idempotency-key")
    assert response.status_code == 200
    allowed = cors_headers(response)
    assert allowed["access-control-allow-origin"] == APP
    assert allowed["access-control-allow-credentials"] == "true"
    assert set(allowed["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
    assert {"authorization", "content-type", "idempotency-key"} <= {
        h.strip().lower() for h in allowed["access-control-allow-headers"].split(",")
    }
    assert allowed["access-control-max-age"] == "600"


def test_a_preflight_from_another_origin_should_be_refused_without_cors_headers(
    url: str,
) -> None:
    response = preflight(url, OTHER, headers="authorization")
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "cors_origin_refused",
            "message": "this origin may not call the API from a browser (it is not in "
            "CORS_ORIGINS)",
        }
    }
    assert cors_headers(response) == {}, "no credentials nor origin for a refused origin"


def test_a_preflight_asking_for_an_unknown_header_should_be_refused(url: str) -> None:
    response = preflight(url, APP, headers="x-secret-admin")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "cors_refused"


def test_calls_from_a_listed_origin_should_carry_the_cors_headers(db: Database, url: str) -> None:
    user = new_user(db)
    response = httpx.get(f"{url}/v1/balance", headers={"Origin": APP, **bearer(user)})
    refused = httpx.get(f"{url}/v1/products", headers={"Origin": OTHER})
    same_origin = httpx.get(f"{url}/v1/products")
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == APP
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "retry-after" in response.headers["access-control-expose-headers"].lower()
    assert "Origin" in response.headers["vary"]
    assert refused.status_code == 200, "the server answers; the browser withholds it"
    assert cors_headers(refused) == {}
    assert "Origin" in refused.headers["vary"]
    assert cors_headers(same_origin) == {}


def test_without_cors_origins_every_preflight_should_be_refused(db: Database) -> None:
    with running_server(settings_for(db)) as base:
        response = preflight(base, APP)
    assert response.status_code == 400, "a preflight is refused, not a 405"
    assert cors_headers(response) == {}
