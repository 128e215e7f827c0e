"""The limits a reverse proxy would otherwise give, against `token-billing serve` itself.

The service runs as a real process (the console command, uvicorn with the options of
token_billing.server.serving) on free ports, and every limit is probed with a raw socket: a
64 KiB header and a 48 MiB unfinished one (refused, the process's memory flat), too many
headers, a too long request line, a slow head, a slow body, idle keep-alive, connections per
client and in all, and /metrics on its own listener only. Timeouts are set to a second or two
so that the waits are short; what is asserted is the answer and that the server closed the
connection, never how fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from scripts.pgcluster import Database, PgCluster
from tests.app_support import JWT_SECRET, STRIPE_KEY, WEBHOOK_SECRET, free_port
from tests.fault_support import report

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HEADER_TIMEOUT = 1
BODY_TIMEOUT = 2
KEEP_ALIVE = 1
PER_CLIENT = 8
MAX_CONNECTIONS = 14
# Reading an answer the server should give: generous, since the machine is shared.
ANSWER_SECONDS = 15.0
# What 48 MiB unfinished headers on ten connections may add to the process: the limit is 32
# KiB a connection plus what the kernel and the allocator keep (measured: +1 MiB; httptools,
# uvicorn's default parser, +492 MiB for the same).
MEMORY_SLACK_MIB = 16


@dataclass(frozen=True)
class Service:
    url: str
    port: int
    metrics_port: int
    pid: int

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def limits_db(pg_cluster: PgCluster, template_db: Database) -> Iterator[Database]:
    name = f"tb_limits_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(name, template=template_db.name)
    yield Database(pg_cluster, name)
    pg_cluster.drop_database(name)


@pytest.fixture(scope="module")
def service(limits_db: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    port, metrics_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "SUPABASE_"))},
        "ENVIRONMENT": "test",
        "DATABASE_URL": limits_db.dsn(),
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "HTTP_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
        "HTTP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
        "HTTP_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE),
        "HTTP_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
        "HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "BALANCE_STREAMS_MAX": "4",
        "METRICS_PORT": str(metrics_port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "token_billing.cli", "serve", "--port", str(port)],
        cwd=tmp_path_factory.mktemp("serve"),  # no stray .env
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.2)
        yield Service(url=url, port=port, metrics_port=metrics_port, pid=proc.pid)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully.
    assert proc.returncode in (0, -signal.SIGTERM), err[-2000:]
    assert "Application shutdown complete." in err


def connect(service: Service, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(ANSWER_SECONDS)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", service.port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return status, headers, json.loads(body) if body else {}


def send_and_read(
    service: Service, request: bytes
) -> tuple[int, dict[str, str], dict[str, object]]:
    with connect(service) as sock:
        # Refused before the whole request was sent: the answer is waiting all the same.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        return answer(read_all(sock))


def get(path: str, *headers: bytes) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(headers) + b"\r\n"


# --- heads ---------------------------------------------------------------------------------------


def test_a_64_kib_header_should_be_refused_with_memory_flat(service: Service) -> None:
    before = service.rss_mib()
    status, headers, body = send_and_read(
        service, get("/healthz", b"X-Big: " + b"a" * 65536 + b"\r\n")
    )
    # Unfinished headers, 48 MiB each if the server kept reading: it stops at its limit.
    accepted = []
    for _ in range(10):
        with connect(service) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            sent = 0
            try:
                while sent < 48 * 1024 * 1024:
                    sock.sendall(b"a" * 65536)
                    sent += 65536
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            accepted.append(sent)
    after = service.rss_mib()
    assert status == 431
    assert headers["connection"] == "close"
    assert body == {
        "error": {"code": "headers_too_large", "message": "a header exceeds 8192 bytes"}
    }
    assert max(accepted) < 48 * 1024 * 1024, "the server should stop reading an endless header"
    assert after - before < MEMORY_SLACK_MIB, f"memory grew from {before:.0f} to {after:.0f} MiB"
    assert httpx.get(f"{service.url}/healthz").status_code == 200
    report(
        "http head limits",
        header_64k_status=status,
        unfinished_48mib_connections=len(accepted),
        kib_sent_before_close_max=max(accepted) // 1024,
        rss_before_mib=round(before, 1),
        rss_after_mib=round(after, 1),
        anomalies=0,
    )


def test_an_unfinished_head_over_the_limit_should_be_a_431(service: Service) -> None:
    status, _, body = send_and_read(
        service, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000
    )
    assert status == 431
    assert body["error"] == {
        "code": "headers_too_large",
        "message": "the request head exceeds 32768 bytes",
    }


def test_too_many_headers_should_be_a_431(service: Service) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    fine = b"".join(b"X-H%d: v\r\n" % i for i in range(90))
    status, _, body = send_and_read(service, get("/healthz", many))
    ok, _, _ = send_and_read(service, get("/healthz", fine, b"Connection: close\r\n"))
    assert status == 431
    assert body["error"] == {"code": "headers_too_large", "message": "more than 100 headers"}
    assert ok == 200


def test_a_too_long_request_line_should_be_a_414(service: Service) -> None:
    status, _, body = send_and_read(service, get("/healthz?q=" + "x" * 9000))
    assert status == 414
    assert body["error"] == {
        "code": "uri_too_long",
        "message": "the request target exceeds 8192 bytes",
    }


# --- read timeouts and keep-alive ----------------------------------------------------------------


def test_a_slow_head_should_get_a_408_and_be_closed(service: Service) -> None:
    with connect(service) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        status, headers, body = answer(read_all(sock))
    assert status == 408
    assert headers["connection"] == "close"
    assert body["error"] == {
        "code": "request_timeout",
        "message": f"the request head did not arrive within {HEADER_TIMEOUT} s",
    }


def test_a_connection_that_sends_nothing_should_be_closed(service: Service) -> None:
    with connect(service) as sock:
        assert read_all(sock) == b"", "an idle new connection is closed without an answer"


def test_a_slow_body_should_get_a_408_and_be_closed(service: Service) -> None:
    with connect(service) as sock:
        sock.sendall(
            b"POST /v1/webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: t=1,v1=0\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b" " * 10
        )
        status, _, body = answer(read_all(sock))
    assert status == 408
    assert body["error"] == {
        "code": "request_timeout",
        "message": f"the request body did not arrive within {BODY_TIMEOUT} s",
    }


def test_an_idle_keep_alive_connection_should_be_closed(service: Service) -> None:
    with connect(service) as sock:
        sock.sendall(get("/healthz"))
        raw = b""
        while b'{"status":"ok"}' not in raw:
            raw += sock.recv(65536)
        assert raw.startswith(b"HTTP/1.1 200")
        assert b"connection: close" not in raw.lower(), "the connection is kept alive first"
        assert read_all(sock) == b"", "then closed once idle for HTTP_KEEP_ALIVE_SECONDS"


# --- connections ---------------------------------------------------------------------------------


def test_one_client_should_hold_at_most_its_connections(service: Service) -> None:
    held = [connect(service) for _ in range(PER_CLIENT)]
    try:
        with connect(service) as extra:
            extra.sendall(get("/healthz"))
            status, headers, body = answer(read_all(extra))
        with connect(service, source="127.0.0.2") as other:
            other.sendall(get("/healthz", b"Connection: close\r\n"))
            other_status, _, _ = answer(read_all(other))
    finally:
        for sock in held:
            sock.close()
    assert status == 503
    assert headers["retry-after"] == "5"
    assert body["error"] == {
        "code": "too_many_connections",
        "message": f"at most {PER_CLIENT} connections at once from one client",
    }
    assert other_status == 200, "another client should not be refused"


def test_the_server_should_hold_at_most_its_connections(service: Service) -> None:
    # From several addresses, so that the per-client limit is not what refuses.
    held = [connect(service, source=f"127.0.0.{10 + i // 4}") for i in range(MAX_CONNECTIONS - 1)]
    try:
        with connect(service, source="127.0.0.30") as extra:
            extra.sendall(get("/healthz"))
            raw = read_all(extra)
    finally:
        for sock in held:
            sock.close()
    assert raw.startswith(b"HTTP/1.1 503"), raw[:80]


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_should_be_on_their_own_listener_only(service: Service) -> None:
    on_api = httpx.get(f"{service.url}/metrics")
    metrics = httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics")
    other = httpx.get(f"http://127.0.0.1:{service.metrics_port}/healthz")
    assert on_api.status_code == 404
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'token_billing_http_requests_total{method="GET",route="/readyz"' in metrics.text, (
        "the listener should serve the API's own registry"
    )
    assert other.status_code == 404, "the metrics listener serves /metrics and nothing else"
