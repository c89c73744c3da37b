"""Property-based fuzzing of the server's own OpenAPI schema (schemathesis): no 5xx, answers as documented.

Hypothesis is driven directly with each operation's strategy rather than through
``schemathesis.pytest.from_fixture``: the server URL is only known once the server
fixture runs, and schemathesis 4.32's pytest glue reads ``item._nodeid``, which
pytest 9 no longer has.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

EXAMPLES_PER_OPERATION = 25
# Valid requests must also get documented statuses, content types and response bodies. Not
# negative_data_rejection: it wants schema-violating requests refused with its own list of
# codes, which lacks 413 (the right answer to more than max_images files).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_generated_request_gets_a_server_error(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/predict", "GET /v1/model", "GET /healthz"}
    failures, fuzzed = {}, []
    for operation in operations:

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=30)

        try:
            call()
            fuzzed.append(operation.label)
        except Unsatisfiable:  # negative mode: an operation without parameters or body has nothing to break
            continue
        except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report them all
            failures[operation.label] = f"{type(e).__name__}: {e}"[:2000]
    assert "POST /v1/predict" in fuzzed or "POST /v1/predict" in failures
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
