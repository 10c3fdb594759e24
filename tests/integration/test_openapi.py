"""The API contract: what ``/openapi.json`` declares (every route's error statuses with the real error body, the
bearer schemes, binary uploads, bounded path numbers), that the real server keeps to it at its edges, and that the
docs pages load nothing from outside the server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from aggregator.app import create_app
from aggregator.deps import MAX_NUMBER, get_device, require_admin
from aggregator.docs import api_routes, implied_errors
from aggregator.schemas import ERROR_STATUSES, ErrorBody
from aggregator.settings import Settings

from .server import Server, admin_headers
from .test_aggregator_http import enroll, setup_federation

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
#: The error statuses of the routes as designed (a route added later is held to the rules of
#: test_every_route_declares_its_errors, and to the fuzz of test_fuzz.py).
DESIGNED = {
    ("post", "/admin/federation"): {400, 401, 403, 409, 413, 422},
    ("put", "/admin/federation/initial"): {401, 403, 409, 413, 422},
    ("post", "/enroll"): {400, 401, 409, 413, 422},
    ("get", "/rounds/current"): {401, 409},
    ("get", "/globals/{version}"): {401, 404, 422},
    ("post", "/rounds/{number}/update"): {401, 404, 409, 413, 422},
    ("delete", "/admin/devices/{device_id}"): {401, 403, 404, 422},
    ("get", "/health"): set(),
    ("get", "/status"): set(),
    ("get", "/status/devices"): set(),
    ("get", "/"): set(),
}


def _app():
    return create_app(Settings(data_dir=Path("unused"), admin_token=None))  # no lifespan: nothing is written


def _calls(route) -> set:
    def walk(dependant):
        yield dependant.call
        for sub in dependant.dependencies:
            yield from walk(sub)
    return set(walk(route.dependant))


def test_every_route_declares_its_errors():
    app = _app()
    schema = app.openapi()
    assert "HTTPValidationError" not in json.dumps(schema) and "ValidationError" not in schema["components"]["schemas"]
    assert set(schema["components"]["securitySchemes"]) == {"deviceToken", "adminToken"}
    assert all(s == {"type": "http", "scheme": "bearer", "description": s["description"]}
               for s in schema["components"]["securitySchemes"].values())
    seen = set()
    for route in api_routes(app):
        calls = _calls(route)
        for method in route.methods:
            key = (method.lower(), route.path_format)
            seen.add(key)
            op = schema["paths"][route.path_format][method.lower()]
            declared = {int(status) for status in op["responses"] if int(status) >= 400}
            where = f"{method} {route.path_format}"
            assert implied_errors(route) <= declared, where
            for status in declared:
                response = op["responses"][str(status)]
                assert response["content"] == {"application/json": {"schema": ERROR_REF}}, where
                assert response["description"] == ERROR_STATUSES[status], where
            security = {name for requirement in op.get("security", []) for name in requirement}
            assert security == ({"adminToken"} if require_admin in calls else set()) | (
                {"deviceToken"} if get_device in calls else set()), where
            if security:
                assert 401 in declared, where
            if "adminToken" in security:
                assert 403 in declared, where
            json_body = "application/json" in op.get("requestBody", {}).get("content", {})
            if op.get("parameters") or json_body:
                assert 422 in declared, where
            if 413 in declared and not json_body:  # a raw upload: described as a binary body
                assert op["requestBody"]["content"] == {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}, where
            for parameter in op.get("parameters", []):
                if parameter["in"] == "path" and parameter["schema"].get("type") == "integer":
                    assert parameter["schema"]["minimum"] >= 0, where
                    assert parameter["schema"]["maximum"] <= MAX_NUMBER, where
            if key in DESIGNED:
                assert declared == DESIGNED[key], where
    assert set(DESIGNED) <= seen


def test_error_statuses_table_refuses_unknown_statuses():
    from aggregator.schemas import error_responses

    assert error_responses(404)[404]["model"] is ErrorBody
    with pytest.raises(ValueError, match="ERROR_STATUSES"):
        error_responses(418)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("contract") / "agg", max_upload_mb=0.01).start()
    try:
        secret = setup_federation(server.url)
        yield server.url, enroll(server.url, secret, "d1")
    finally:
        server.stop()


def test_the_server_serves_the_contract(live):
    url, _ = live
    served = httpx.get(url + "/openapi.json").json()
    assert served == json.loads(json.dumps(_app().openapi()))


def _error(response: httpx.Response, status: int, code: str) -> ErrorBody:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = ErrorBody.model_validate(response.json())
    assert body.error == code, body
    assert set(response.json()) == {"error", "detail", "extra"}
    return body


@pytest.mark.parametrize("number", ["-1", str(2**31), str(2**63), "9" * 30, "1.5", "x"])
def test_numbers_out_of_range_in_paths_get_422(live, number):
    url, device = live
    _error(httpx.get(f"{url}/globals/{number}", headers=device), 422, "invalid_request")
    for path in (f"/rounds/{number}/update", f"/admin/rounds/{number}/retry", f"/admin/rounds/{number}/close"):
        headers = admin_headers() if path.startswith("/admin") else device
        _error(httpx.post(url + path, headers=headers, content=b"x"), 422, "invalid_request")


def test_round_numbers_start_at_1(live):
    url, device = live
    _error(httpx.post(f"{url}/rounds/0/update", headers=device, content=b"x"), 422, "invalid_request")
    _error(httpx.post(f"{url}/rounds/2/update", headers=device, content=b"x"), 404, "not_found")
    assert httpx.get(f"{url}/globals/0", headers=device).status_code == 200


@pytest.mark.parametrize("token", ["tök\u00e9n-0123456789abcdefghijkl", "\u20ac" * 30])
def test_non_ascii_bearer_tokens_get_401(live, token):
    url, _ = live
    for encoding in ("utf-8", "latin-1"):
        try:
            raw = ("Bearer " + token).encode(encoding)
        except UnicodeEncodeError:
            continue
        headers = {"Authorization": raw}
        _error(httpx.post(url + "/admin/federation", headers=headers, json={"config": {"base_model": "x"}}), 401,
               "unauthorized")
        _error(httpx.get(url + "/rounds/current", headers=headers), 401, "unauthorized")


def test_bodies_that_cannot_be_read_get_the_error_body(live):
    url, _ = live
    json_headers = {"Content-Type": "application/json"}
    lone_surrogate = b'{"enroll_secret": "\\ud800", "name": "d", "capabilities": {"n_specialists": 1, "rank": 8}}'
    _error(httpx.post(url + "/enroll", headers=json_headers, content=lone_surrogate), 422, "invalid_request")
    _error(httpx.post(url + "/enroll", headers=json_headers, content=b'{"name": "\xff\xfe"}'), 400, "bad_request")
    _error(httpx.post(url + "/enroll", headers=json_headers, content=b'{"name": '), 422, "invalid_request")
    for field in ("round_deadline_s", "alpha"):  # 1e400 parses as infinity: /status could not write it back
        body = b'{"config": {"base_model": "x", "%s": 1e400}}' % field.encode()
        _error(httpx.post(url + "/admin/federation", headers={**admin_headers(), **json_headers}, content=body), 422,
               "invalid_request")
    _error(httpx.get(url + "/no/such/path"), 404, "not_found")
    _error(httpx.delete(url + "/status"), 405, "method_not_allowed")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_outside_the_server(live, page):
    url, _ = live
    r = httpx.get(url + page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    absolute = re.findall(r"https?://[^\s\"'<>)]+", r.text)
    assert all(link.startswith(url) for link in absolute), absolute
    assets = re.findall(r"(?:src|href)=\"([^\"]+)\"", r.text)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        fetched = httpx.get(urljoin(url + page, asset))
        assert fetched.status_code == 200 and len(fetched.content) > 0, asset
        if asset.endswith(".js"):
            assert "javascript" in fetched.headers["content-type"], asset
        if asset.endswith(".css"):
            assert fetched.headers["content-type"].startswith("text/css"), asset
    spec = re.search(r"(?:url: '|spec-url=\")([^'\"]+)", r.text).group(1)
    assert httpx.get(urljoin(url + page, spec)).json()["info"]["title"] == "CoMiGS aggregator"
    csp = r.headers["content-security-policy"]  # the browser refuses anything from elsewhere too
    assert "default-src 'none'" in csp and "http" not in csp


def test_only_the_routes_that_take_a_safetensors_file_get_the_upload_limit():
    from aggregator.body_limit import JSON_BODY_LIMIT, route_limits

    limit_for = route_limits(_app(), 123_456_789)

    def limit(method: str, path: str, root_path: str = "") -> int:
        size, takes_file = limit_for({"type": "http", "method": method, "path": root_path + path,
                                      "root_path": root_path})
        assert takes_file == (size != JSON_BODY_LIMIT)
        return size

    assert limit("PUT", "/admin/federation/initial") == limit("POST", "/rounds/7/update") == 123_456_789
    assert limit("POST", "/rounds/7/update", root_path="/agg") == 123_456_789  # behind a proxy's prefix
    for method, path in [("POST", "/enroll"), ("POST", "/admin/federation"), ("GET", "/rounds/7/update"),
                         ("POST", "/rounds/7/update/extra"), ("GET", "/globals/1")]:
        assert limit(method, path) == JSON_BODY_LIMIT, (method, path)
