# The tables of hostile requests read best one request per line.
# ruff: noqa: E501
"""Bad input against a real web process: hostile values in every field are refused with a
4xx JSON error (never a 500, never a traceback), and schemathesis fuzzes every route of
the live ``/openapi.json``, with and without API keys, checking the answers against it.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import report
from tierline.testing.databases import query
from tierline.testing.processes import Cluster, Proc

pytestmark = pytest.mark.e2e

KEY = "fuzz-key-1f4e8a7b"


@pytest.fixture(scope="module")
def web(module_cluster: Cluster) -> tuple[Proc, str]:
    proc, url = module_cluster.web()
    module_cluster.wait_ready(url, proc)
    return proc, url


@pytest.fixture(scope="module")
def keyed_web(module_cluster: Cluster) -> tuple[Proc, str]:
    proc, url = module_cluster.web(TIERLINE_API_KEYS=KEY)
    module_cluster.wait_ready(url, proc)
    return proc, url


JSON = {"content-type": "application/json"}
DEEP = 100_000


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


# (name, method, path, httpx keyword arguments): each must be refused with a 4xx.
HOSTILE: list[tuple[str, str, str, dict[str, Any]]] = [
    # Quotes, NUL bytes, control characters, unicode in every field.
    ("quote in kind", "POST", "/v1/jobs", {"json": {"kind": "noop'; DROP TABLE x;--"}}),
    ("NUL in kind", "POST", "/v1/jobs", {"json": {"kind": "no\x00op"}}),
    ("NUL in queue", "POST", "/v1/jobs", {"json": {"kind": "noop", "queue": "q\x00"}}),
    ("quote in queue", "POST", "/v1/jobs", {"json": {"kind": "noop", "queue": 'a"b'}}),
    ("NUL in args", "POST", "/v1/jobs", {"json": {"kind": "record", "args": {"token": "a\x00"}}}),
    ("NUL in arg name", "POST", "/v1/jobs", {"json": {"kind": "noop", "args": {"\x00": 1}}}),
    ("NUL in any JSON", "POST", "/v1/jobs", {"json": {"kind": "echo", "args": {"payload": "\x00"}}}),
    ("NUL in key", "POST", "/v1/jobs", {"json": {"kind": "noop", "idempotency_key": "k\x00"}}),
    ("key too long", "POST", "/v1/jobs", {"json": {"kind": "noop", "idempotency_key": "k" * 256}}),
    ("empty key", "POST", "/v1/jobs", {"json": {"kind": "noop", "idempotency_key": ""}}),
    ("RTL kind", "POST", "/v1/jobs", {"json": {"kind": "\u202enoop"}}),
    ("emoji kind", "POST", "/v1/jobs", {"json": {"kind": "🔥"}}),
    ("kind too long", "POST", "/v1/jobs", {"json": {"kind": "a" * 201}}),
    ("unknown kind", "POST", "/v1/jobs", {"json": {"kind": "../../etc/passwd"}}),
    ("unknown field", "POST", "/v1/jobs", {"json": {"kind": "noop", "__proto__": {}}}),
    ("args not object", "POST", "/v1/jobs", {"json": {"kind": "noop", "args": "x"}}),
    ("args null", "POST", "/v1/jobs", {"json": {"kind": "noop", "args": None}}),
    ("args wrong type", "POST", "/v1/jobs", {"json": {"kind": "add", "args": {"a": "1; rm"}}}),
    ("extra arg", "POST", "/v1/jobs", {"json": {"kind": "add", "args": {"a": 1, "zz": 2}}}),
    # Lone surrogates: valid JSON escapes, not valid Unicode.
    ("surrogate in args", "POST", "/v1/jobs", {"content": b'{"kind":"record","args":{"token":"\\ud800"}}', "headers": JSON}),
    ("surrogate in any JSON", "POST", "/v1/jobs", {"content": b'{"kind":"echo","args":{"payload":{"\\udfff":1}}}', "headers": JSON}),
    ("surrogate in key", "POST", "/v1/jobs", {"content": b'{"kind":"noop","idempotency_key":"\\ud800"}', "headers": JSON}),
    ("surrogate in batch", "POST", "/v1/jobs/batch", {"content": b'{"jobs":[{"kind":"record","args":{"token":"\\udbff"}}]}', "headers": JSON}),
    # Invalid UTF-8, not JSON, wrong types and encodings.
    ("invalid UTF-8", "POST", "/v1/jobs", {"content": b'{"kind":"record","args":{"token":"\xff\xfe\xc3("}}', "headers": JSON}),
    ("overlong UTF-8", "POST", "/v1/jobs", {"content": b'{"kind":"\xc0\xafnoop"}', "headers": JSON}),
    ("not JSON", "POST", "/v1/jobs", {"content": b"kind=noop", "headers": JSON}),
    ("truncated JSON", "POST", "/v1/jobs", {"content": b'{"kind": "noop"', "headers": JSON}),
    ("JSON array", "POST", "/v1/jobs", {"json": [{"kind": "noop"}]}),
    ("JSON string", "POST", "/v1/jobs", {"json": "noop"}),
    ("empty body", "POST", "/v1/jobs", {"content": b"", "headers": JSON}),
    ("form body", "POST", "/v1/jobs", {"data": {"kind": "noop"}}),
    ("xml body", "POST", "/v1/jobs", {"content": b"<kind>noop</kind>", "headers": {"content-type": "application/xml"}}),
    ("gzip lie", "POST", "/v1/jobs", {"content": b"\x1f\x8bnot gzip", "headers": {**JSON, "content-encoding": "gzip"}}),
    ("batch not list", "POST", "/v1/jobs/batch", {"json": {"jobs": {"kind": "noop"}}}),
    ("batch empty", "POST", "/v1/jobs/batch", {"json": {"jobs": []}}),
    ("batch bad item", "POST", "/v1/jobs/batch", {"json": {"jobs": [{"kind": "noop"}, {"kind": 1}]}}),
    ("batch NUL item", "POST", "/v1/jobs/batch", {"json": {"jobs": [{"kind": "record", "args": {"token": "\x00"}}]}}),
    # Huge JSON and deep nesting.
    ("huge args", "POST", "/v1/jobs", {"json": {"kind": "echo", "args": {"payload": "a" * 300_000}}}),
    ("many args", "POST", "/v1/jobs", {"json": {"kind": "echo", "args": {"payload": {str(i): i for i in range(30_000)}}}}),
    ("deep nesting", "POST", "/v1/jobs", {"content": b'{"kind":"echo","args":{"payload":' + nested(DEEP) + b"}}", "headers": JSON}),
    ("nesting past 255", "POST", "/v1/jobs", {"content": b'{"kind":"echo","args":{"payload":' + nested(300) + b"}}", "headers": JSON}),
    ("deep objects", "POST", "/v1/jobs", {"content": b'{"kind":"echo","args":{"payload":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}}", "headers": JSON}),
    ("deep batch", "POST", "/v1/jobs/batch", {"content": b'{"jobs":' + nested(DEEP, b"{}") + b"}", "headers": JSON}),
    # Enormous numbers.
    ("huge int priority", "POST", "/v1/jobs", {"content": b'{"kind":"noop","priority":1' + b"0" * 5000 + b"}", "headers": JSON}),
    ("huge int arg", "POST", "/v1/jobs", {"content": b'{"kind":"add","args":{"a":1' + b"0" * 5000 + b"}}", "headers": JSON}),
    ("float overflow", "POST", "/v1/jobs", {"content": b'{"kind":"echo","args":{"payload":1e400}}', "headers": JSON}),
    ("NaN", "POST", "/v1/jobs", {"content": b'{"kind":"echo","args":{"payload":NaN}}', "headers": JSON}),
    ("Infinity delay", "POST", "/v1/jobs", {"content": b'{"kind":"noop","delay_s":Infinity}', "headers": JSON}),
    ("negative delay", "POST", "/v1/jobs", {"json": {"kind": "noop", "delay_s": -1}}),
    ("max_attempts 0", "POST", "/v1/jobs", {"json": {"kind": "noop", "max_attempts": 0}}),
    ("max_attempts huge", "POST", "/v1/jobs", {"json": {"kind": "noop", "max_attempts": 10**30}}),
    ("priority float", "POST", "/v1/jobs", {"json": {"kind": "noop", "priority": 1.5}}),
    ("timeout negative", "POST", "/v1/jobs", {"json": {"kind": "noop", "timeout_s": -5}}),
    # Times out of range (year 10000 in UTC could be stored but never read back).
    ("run_at year 10000 in UTC", "POST", "/v1/jobs", {"json": {"kind": "noop", "run_at": "9999-12-31T23:59:59-14:00"}}),
    ("run_at year 0 in UTC", "POST", "/v1/jobs", {"json": {"kind": "noop", "run_at": "0001-01-01T00:00:00+10:00"}}),
    ("run_at naive", "POST", "/v1/jobs", {"json": {"kind": "noop", "run_at": "2030-01-01T00:00:00"}}),
    ("run_at garbage", "POST", "/v1/jobs", {"json": {"kind": "noop", "run_at": "tomorrow'--"}}),
    ("run_at and delay", "POST", "/v1/jobs", {"json": {"kind": "noop", "run_at": "2030-01-01T00:00:00Z", "delay_s": 1}}),
    # Path traversal and odd ids.
    ("traversal id", "GET", "/v1/jobs/..%2f..%2fetc%2fpasswd", {}),
    ("traversal dots", "GET", "/v1/jobs/%2e%2e", {}),
    ("traversal cancel", "POST", "/v1/jobs/..%2F1/cancel", {}),
    ("traversal events", "GET", "/v1/jobs/%2e%2e%2f%2e%2e/events", {}),
    ("traversal static", "GET", "/static/..%2f..%2f..%2fsettings.py", {}),
    ("id zero", "GET", "/v1/jobs/0", {}),
    ("id negative", "GET", "/v1/jobs/-1", {}),
    ("id float", "GET", "/v1/jobs/1.5", {}),
    ("id over bigint", "GET", "/v1/jobs/9223372036854775808", {}),
    ("id huge", "POST", "/v1/jobs/" + "9" * 5000 + "/retry", {}),
    ("id unicode digits", "GET", "/v1/jobs/%D9%A1%D9%A2", {}),
    ("id superscript", "GET", "/v1/jobs/%C2%B2", {}),
    ("id NUL", "GET", "/v1/jobs/1%00", {}),
    ("id unknown", "GET", "/v1/jobs/987654321", {}),
    ("cancel unknown", "POST", "/v1/jobs/987654321/cancel", {}),
    ("retry unknown", "POST", "/v1/jobs/987654321/retry", {}),
    ("events unknown", "GET", "/v1/jobs/987654321/events", {}),
    # Query strings and headers.
    ("state unknown", "GET", "/v1/jobs?state=done'--", {}),
    ("queue invalid UTF-8", "GET", "/v1/jobs?queue=%ff%fe", {}),
    ("kind NUL", "GET", "/v1/jobs?kind=%00", {}),
    ("limit huge", "GET", "/v1/jobs?limit=" + "9" * 100, {}),
    ("cursor injection", "GET", "/v1/jobs?cursor=1%20OR%201=1", {}),
    ("cursor huge", "GET", "/v1/jobs?cursor=99999999999999999999", {}),
    ("firehose queue NUL", "GET", "/v1/events?queue=%00", {}),
    ("firehose kind quote", "GET", "/v1/events?kind=a'b", {}),
    ("after huge", "GET", "/v1/jobs/1/events?after=99999999999", {}),
    ("Last-Event-ID text", "GET", "/v1/jobs/1/events", {"headers": {"Last-Event-ID": "../../x"}}),
    ("Last-Event-ID huge", "GET", "/v1/jobs/1/events", {"headers": {"Last-Event-ID": "9" * 400}}),
    ("firehose Last-Event-ID", "GET", "/v1/events", {"headers": {"Last-Event-ID": "1-2-3'"}}),
    ("firehose Last-Event-ID huge", "GET", "/v1/events", {"headers": {"Last-Event-ID": "9" * 30 + "-1"}}),
    ("wrong method", "DELETE", "/v1/jobs/1", {}),
    ("wrong method on list", "PUT", "/v1/jobs", {}),
]  # fmt: skip

# Raw requests for what httpx refuses to send: bytes that are not ASCII in headers.
RAW: list[tuple[str, bytes]] = [
    ("Last-Event-ID latin-1 digit", b"GET /v1/jobs/1/events HTTP/1.1\r\nLast-Event-ID: \xb2\r\n"),
    ("Last-Event-ID UTF-8 digits", b"GET /v1/jobs/1/events HTTP/1.1\r\nLast-Event-ID: \xd9\xa1\r\n"),
    ("firehose id latin-1", b"GET /v1/events HTTP/1.1\r\nLast-Event-ID: \xb2-\xb9\r\n"),
    ("authorization bytes", b"GET /v1/jobs/1 HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\x80\r\n"),
    ("content-type charset bytes", b"POST /v1/jobs HTTP/1.1\r\nContent-Type: application/json; charset=\xff\r\nContent-Length: 2\r\n\r\n{}"),
    ("bad content-length", b"POST /v1/jobs HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 99999999999999999999\r\n\r\n{}"),
    # Refused on its Content-Length before the body is read (a client that keeps sending
    # gets a reset, so only the start of the body is sent here).
    ("huge body", b"POST /v1/jobs HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{\"kind\":\"noop\",\"x\":\"aaaa"),
]  # fmt: skip


def raw_request(url: str, head: bytes) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    request = head.split(b"\r\n\r\n", 1)
    body = request[1] if len(request) > 1 else b""
    data = request[0] + b"\r\nHost: x\r\nConnection: close\r\n\r\n" + body
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, headers, payload


def assert_clean_4xx(name: str, status: int, headers: Any, body: bytes) -> None:
    assert 400 <= status < 500, f"{name}: {status} {body[:300]!r}"
    text = body.decode("utf-8", "replace")
    assert "Traceback" not in text and 'File "' not in text, f"{name}: {text[:300]}"
    # uvicorn itself answers requests it cannot parse, as plain text, before any app code.
    if headers.get("content-type", "").startswith("text/plain") and status == 400:
        assert text.startswith("Invalid HTTP request"), f"{name}: {text[:300]}"
        return
    assert headers.get("content-type", "").startswith("application/json"), f"{name}: {headers}"
    error = json.loads(body)["error"]
    assert error["status"] == status, name
    assert isinstance(error["code"], str) and error["code"], name
    assert isinstance(error["message"], str) and len(error["message"]) < 5000, name


def assert_clean_log(proc: Proc) -> None:
    """No bug reported by the process: no unhandled error, traceback or warning."""
    log = proc.output()
    for sign in ("unhandled error", "Traceback", "Exception in ASGI application", "Warning:"):
        assert sign not in log, f"{sign!r} in the log:\n{log[-3000:]}"


def test_hostile_input_is_refused_with_a_json_4xx(web: tuple[Proc, str], module_db: str) -> None:
    proc, url = web
    before = query(module_db, "SELECT count(*) AS n FROM tierline.jobs")[0]["n"]
    with httpx.Client(timeout=30) as client:
        for name, method, path, kw in HOSTILE:
            try:
                r = client.request(method, url + path, **kw)
            except httpx.HTTPError as exc:
                raise AssertionError(f"{name}: {exc!r}") from exc
            assert_clean_4xx(name, r.status_code, r.headers, r.content)
    for name, head in RAW:
        status, headers, body = raw_request(url, head)
        assert_clean_4xx(name, status, headers, body)
    after = query(module_db, "SELECT count(*) AS n FROM tierline.jobs")[0]["n"]
    assert after == before, "a refused request left a job behind"
    # Every listing still works (no row that cannot be read back got in).
    assert httpx.get(f"{url}/v1/jobs?limit=500").status_code == 200
    assert_clean_log(proc)
    report("hostile_input", cases=len(HOSTILE) + len(RAW), server_errors=0)


def test_odd_but_valid_input_round_trips(web: tuple[Proc, str], module_cluster: Cluster) -> None:
    """What is not hostile is stored and read back exactly: unicode, quotes, big numbers,
    nesting within the parser's limits; and a worker runs it."""
    _, url = web
    payloads: list[Any] = [
        "Robert'); DROP TABLE jobs;--",
        "\u202e\u200b𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🔥 ✓ \t\n\\",
        {"../../etc/passwd": "<script>alert(1)</script>"},
        2**80,
        -(2**63),
        -0.000123,
        [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
        json.loads(nested(250).decode()),
    ]
    ids = []
    with httpx.Client(timeout=30) as client:
        for payload in payloads:
            r = client.post(f"{url}/v1/jobs", json={"kind": "echo", "args": {"payload": payload}})
            assert r.status_code == 202, r.text
            assert r.json()["args"]["payload"] == payload
            ids.append(r.json()["id"])
        key = "ключ-🔑-'\"-" + "é" * 200
        r1 = client.post(f"{url}/v1/jobs", json={"kind": "noop", "idempotency_key": key})
        r2 = client.post(f"{url}/v1/jobs", json={"kind": "noop", "idempotency_key": key})
        assert (r1.status_code, r2.status_code) == (202, 200)
        assert r1.json()["id"] == r2.json()["id"] and r2.json()["idempotency_key"] == key
    worker, wurl = module_cluster.worker()
    module_cluster.wait_ready(wurl, worker)
    with httpx.Client(timeout=30) as client:

        def done() -> bool:
            return all(client.get(f"{url}/v1/jobs/{i}").json()["state"] == "succeeded" for i in ids)

        from tierline.testing.waiting import wait_for

        wait_for(done, 60, "the odd jobs to run")
        for job_id, payload in zip(ids, payloads, strict=True):
            assert client.get(f"{url}/v1/jobs/{job_id}").json()["result"] == payload
    worker.stop()


# -- schemathesis --------------------------------------------------------------------------
MAX_EXAMPLES = 30
SSE_TIMEOUT_S = 1.0


def _fuzz(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """Every operation of the live schema, positive and negative cases; returns figures."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers)
    figures: dict[str, Any] = {
        "cases": 0,
        "operations": 0,
        "statuses": {},
        "streams_opened": 0,
        "no_negative_cases": [],
        "seconds": {},
    }
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an Err fails the test here
        figures["operations"] += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = _runner(operation, mode, url, headers, checks, figures)
            started = time.monotonic()
            try:
                run()
            except Unsatisfiable:  # no parameters to make invalid (e.g. GET /v1/queues)
                figures["no_negative_cases"].append(operation.label)
            took = figures["seconds"]
            took[operation.label] = round(
                took.get(operation.label, 0) + time.monotonic() - started, 1
            )
    _fuzz_accepted(schema, url, headers, checks, figures)
    return figures


def _fuzz_accepted(
    schema: Any, url: str, headers: dict[str, str], checks: list[Any], figures: dict[str, Any]
) -> None:
    """Generated kinds are almost never registered ones (422): here bodies name a real
    kind and carry any JSON, so the 202 path and its response schema are fuzzed too."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    # Any Unicode but NUL and lone surrogates (both refused, see the hostile cases).
    chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(chars)
    )
    payloads = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(chars, max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    )
    options = st.fixed_dictionaries(
        {"kind": st.just("echo"), "args": st.fixed_dictionaries({"payload": payloads})},
        optional={
            "priority": st.integers(-100, 100),
            "delay_s": st.floats(0, 3600),
            "max_attempts": st.integers(1, 1000),
            "idempotency_key": st.text(chars, min_size=1, max_size=50),
        },
    )
    single = schema["/v1/jobs"]["POST"]
    batch = schema["/v1/jobs/batch"]["POST"]

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=options, many=st.lists(options, min_size=1, max_size=5))
    def run(body: dict[str, Any], many: list[dict[str, Any]]) -> None:
        for case in (single.Case(body=body), batch.Case(body={"jobs": many})):
            response = case.call(base_url=url, headers=headers, timeout=30)
            figures["cases"] += 1
            code = str(response.status_code)
            figures["statuses"][code] = figures["statuses"].get(code, 0) + 1
            assert response.status_code in (200, 202), response.text
            case.validate_response(response, checks=checks, headers=headers)

    run()


def _runner(
    operation: Any,
    mode: Any,
    url: str,
    headers: dict[str, str],
    checks: list[Any],
    figures: dict[str, Any],
) -> Any:
    from hypothesis import HealthCheck, given, settings

    # An open SSE stream never ends by itself: schemathesis reads it for at most the
    # timeout, then checks its status, headers and content type like any response.
    timeout = SSE_TIMEOUT_S if operation.path.endswith("/events") else 30.0
    streaming = operation.path.endswith("/events")

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=url, headers=headers, timeout=timeout)
        figures["cases"] += 1
        code = str(response.status_code)
        figures["statuses"][code] = figures["statuses"].get(code, 0) + 1
        if streaming and response.status_code == 200:
            figures["streams_opened"] += 1
        case.validate_response(response, checks=checks, headers=headers)

    return run


def test_schemathesis_without_keys(web: tuple[Proc, str]) -> None:
    proc, url = web
    figures = _fuzz(url, {})
    assert figures["operations"] >= 10
    assert "500" not in figures["statuses"]
    assert_clean_log(proc)
    report("schemathesis", keys=False, **figures)


def test_schemathesis_with_keys(keyed_web: tuple[Proc, str]) -> None:
    proc, url = keyed_web
    figures = _fuzz(url, {"Authorization": f"Bearer {KEY}"})
    assert "500" not in figures["statuses"]
    # With the key the fuzzer reached the handlers: not everything was a 401.
    assert (
        sum(n for code, n in figures["statuses"].items() if code != "401") > figures["cases"] // 2
    )
    assert_clean_log(proc)
    report("schemathesis", keys=True, **figures)
