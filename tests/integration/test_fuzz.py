"""A bounded property-based fuzz of the real aggregator from its own OpenAPI schema (schemathesis).

For each operation of ``/openapi.json``, schemathesis generates requests that match the schema (positive) and
requests that break it (negative: wrong types, out-of-range numbers, missing fields, bad tokens), sends them to the
real server and checks each answer: no 5xx, a documented status, a documented content type, a body that matches
the documented schema. The federation is set up first (so rounds, globals and uploads are live), and every route is
called as the identity it is meant for (a device on device routes, the admin on admin routes) and as the other one.

Derandomized: the same cases every run (a failure reproduces; the report ends with a curl command). About 1,800
requests, under a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import collections
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from aggregator.app import create_app
from aggregator.settings import Settings

from .server import Server, admin_headers
from .test_aggregator_http import enroll, payload, setup_federation, tensors

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
FEDERATION_RANK = 8  # FederationConfig's default rank, which setup_federation keeps
#: Cases per operation: valid requests as the route's own caller, invalid ones, valid ones as the other caller.
EXAMPLES = {"positive": 120, "negative": 80, "other caller": 20}


def _operations() -> list[tuple[str, str]]:
    """``(method, path)`` of every operation the app publishes (built in-process; the server serves the same)."""
    app = create_app(Settings(data_dir=Path("unused"), admin_token=None))  # no lifespan: nothing is written
    return [(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The real server with a federation set up and one enrolled device; its schema as schemathesis loads it."""
    server = Server(tmp_path_factory.mktemp("fuzz") / "agg", max_upload_mb=0.01).start()
    try:
        secret = setup_federation(server.url, min_devices=2)
        device = enroll(server.url, secret, "fuzz-device")
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        with requests.Session() as session:
            yield {"url": server.url, "secret": secret, "device": device, "admin": admin_headers(),
                   "schema": schema, "openapi": session.get(server.url + "/openapi.json").json(),
                   "session": session}
    finally:
        server.stop()


def _callers(method: str, path: str, live: dict) -> tuple[dict, dict]:
    """The headers of the route's own caller and of the other one (open routes: the device, then the admin)."""
    security = live["openapi"]["paths"][path][method.lower()].get("security", [])
    schemes = {name for requirement in security for name in requirement}
    if "adminToken" in schemes:
        return live["admin"], live["device"]
    return live["device"], live["admin"]


def _fuzz(operation, live: dict, mode: GenerationMode, headers: dict, examples: int) -> collections.Counter:
    """Run ``examples`` generated cases; returns the statuses the server answered with."""
    statuses: collections.Counter = collections.Counter()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        if mode is GenerationMode.POSITIVE and operation.path == "/enroll" and isinstance(case.body, dict):
            # the real secret and rank reach the capability checks and enroll devices (not only 401 and 422)
            case.body["enroll_secret"] = live["secret"]
            if isinstance(case.body.get("capabilities"), dict):
                case.body["capabilities"]["rank"] = FEDERATION_RANK
        if operation.path == "/admin/devices/{device_id}" and (case.path_parameters or {}).get("device_id") == 1:
            case.path_parameters["device_id"] = 10**6  # keep the fixture's device (id 1) for the later tests: 404
        response = case.call_and_validate(base_url=live["url"], session=live["session"], headers=headers,
                                          checks=CHECKS)
        statuses[response.status_code] += 1

    try:
        run()
    except hypothesis.errors.Unsatisfiable:  # an operation without inputs has no invalid request to make
        assert mode is GenerationMode.NEGATIVE and not statuses, statuses
    return statuses


@pytest.mark.parametrize(("method", "path"), _operations(), ids=lambda value: value)
def test_fuzz_operation(live, method, path):
    operation = live["schema"][path][method]
    own, other = _callers(method, path, live)
    runs = {"positive": _fuzz(operation, live, GenerationMode.POSITIVE, own, EXAMPLES["positive"]),
            "negative": _fuzz(operation, live, GenerationMode.NEGATIVE, own, EXAMPLES["negative"]),
            "other caller": _fuzz(operation, live, GenerationMode.POSITIVE, other, EXAMPLES["other caller"])}
    print(f"{method} {path}: " + "; ".join(f"{name} {sum(s.values())} cases {dict(sorted(s.items()))}"
                                          for name, s in runs.items()))
    assert sum(runs["positive"].values()) >= 1


def test_success_answers_match_the_schema(live):
    """The answers the fuzz rarely reaches (a global's bytes, an accepted upload, its replay) pass the same checks.

    Runs after the fuzz (it uploads the device's tensors for round 1, which later fuzz uploads would then hit)."""
    schema, device = live["schema"], live["device"]
    cases = [
        (schema["/globals/{version}"]["GET"].Case(path_parameters={"version": 0}), device, 200),
        (schema["/rounds/{number}/update"]["POST"].Case(path_parameters={"number": 1}, body=payload(tensors(1.0)),
                                                        media_type="application/octet-stream"), device, 200),
        (schema["/rounds/{number}/update"]["POST"].Case(path_parameters={"number": 1}, body=payload(tensors(1.0)),
                                                        media_type="application/octet-stream"), device, 200),
        (schema["/rounds/current"]["GET"].Case(), device, 200),
        (schema["/status"]["GET"].Case(), {}, 200),
        (schema["/status/devices"]["GET"].Case(), {}, 200),
    ]
    for case, headers, status in cases:
        response = case.call_and_validate(base_url=live["url"], session=live["session"], headers=headers,
                                          checks=CHECKS)
        assert response.status_code == status, (case.path, response.text)
