"""Fuzzing the server with schemathesis from its own OpenAPI schema (`/openapi.json`): every endpoint gets a
bounded number of generated requests, valid and invalid, on a tiny model with a short context; no response
may be a 5xx, and afterwards the engine is idle (nothing running or waiting, every KV block free)."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from server_helpers import ServerThread, save_random_model

from glm45.server.config import ServerConfig

EXAMPLES_PER_ENDPOINT = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_random_model(tmp_path_factory.mktemp("fuzz_model"))
    # A short context keeps every generated request cheap (at most 64 tokens per sequence).
    with ServerThread(folder, ServerConfig(request_body_timeout=5.0), max_model_len=64) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_ENDPOINT, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, server):
    response = case.call(timeout=60)
    case.validate_response(response, checks=[not_a_server_error])


def test_the_engine_is_idle_after_fuzzing(server):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = server.engine.stats()
        if (stats["num_running"], stats["num_waiting"], stats["kv_cache_usage"]) == (0, 0, 0.0):
            break
        time.sleep(0.1)
    assert (stats["num_running"], stats["num_waiting"], stats["kv_cache_usage"]) == (0, 0, 0.0), stats
    assert not server.engine.has_unfinished_requests()
    assert server.app.state.async_engine.is_alive
