"""The OpenAPI document the server serves describes what it answers, and schemathesis, generating
requests from it (valid and invalid), never gets a 5xx nor an answer the document does not describe."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from conftest import LOOPBACK
from rnnserve.server.faces.web.completions import OPENAPI_PATHS
from rnnserve.server.faces.web.openapi import document
from rnnserve.server.faces.web.routes import ROUTES
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2
from serving import RunningServer


@pytest.fixture(scope="module")
def web_server(bundle):
    # Small limits keep each generated Generate call short; nothing else differs from the defaults.
    running = RunningServer(bundle, Settings(**LOOPBACK, http_listen="127.0.0.1:0", max_generate_tokens=64,
                                             max_sessions=200, when_full="evict-oldest"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def base_url(web_server) -> str:
    return f"http://127.0.0.1:{web_server.server.http_port}"


@pytest.mark.parametrize("name", ["Inference", "Admin"])
def test_every_rpc_of_the_service_has_a_route(name):
    """A new RPC without its row in routes.ROUTES would be missing from the HTTP face: this says so."""
    service = rnnserve_pb2.DESCRIPTOR.services_by_name[name]
    assert set(service.methods_by_name) == {route.name for route in ROUTES if route.service == service.full_name}


def test_the_served_document_has_every_route_and_the_request_fields(base_url):
    served = httpx.get(f"{base_url}/openapi.json").json()
    assert served == document(ROUTES, OPENAPI_PATHS)
    assert {(path, verb) for path, operations in served["paths"].items() for verb in operations} >= \
        {(route.path, route.verb.lower()) for route in ROUTES}
    step = served["components"]["schemas"]["rnnserve_v1_StepRequest"]["properties"]
    assert set(step) == {"session_id", "token_ids", "text", "top_k", "temperature", "expected_position",
                         "request_id"}
    assert step["top_k"] == {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}


# schemathesis's pytest plugin does not run under pytest 9 (it reads a private field of the node), so the
# operations are parametrised here and each is driven through Hypothesis directly, as the plugin would.
OPERATIONS = [result.ok() for result in schemathesis.openapi.from_dict(document(ROUTES, OPENAPI_PATHS)).get_all_operations()]


# Invalid requests for every operation with a body; the others take only strings in their paths, which
# nothing the document allows can make invalid.
CASES = [(operation, GenerationMode.POSITIVE) for operation in OPERATIONS] + \
        [(operation, GenerationMode.NEGATIVE) for operation in OPERATIONS if operation.method == "post"]


@pytest.mark.parametrize(("operation", "mode"), CASES, ids=lambda value: getattr(value, "label", None) or value.value)
def test_no_generated_request_gets_a_server_error(operation, mode, base_url):
    """Valid requests (by the document) and invalid ones alike: 2xx or 4xx, each as documented."""
    @given(case=operation.as_strategy(mode))
    @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def call(case):
        case.call_and_validate(base_url=base_url, checks=[not_a_server_error, status_code_conformance,
                                                          response_schema_conformance])

    call()
