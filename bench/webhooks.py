"""Webhooks end to end: signed real events into `token-billing serve` (one uvicorn worker) at
32 concurrent connections, mixed types with 10% duplicates, against the same load on a bare
Starlette endpoint (bench/bare_app.py), interleaved in rounds. The load generator
(bench/loadgen.py) runs in its own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench import pyspy, stripe
from bench.report import Row
from scripts.pgcluster import OWNER, ROOT, PgCluster, free_port

if TYPE_CHECKING:
    from bench.run import Options

CONNECTIONS = 32
DUPLICATES = 0.1
MAIN_DB = "tb_bench"
VENV_BIN = Path(sys.executable).parent


def service_missing() -> str | None:
    """Why the service cannot be benched yet, or None."""
    if not (ROOT / "api" / "token_billing" / "server" / "app.py").exists():
        return "api/token_billing/server/app.py (create_app) is not there yet"
    if shutil.which("token-billing", path=str(VENV_BIN)) is None:
        return "the token-billing command is not installed in the venv"
    if not stripe.fixtures_present():
        return f"the Stripe fixtures are missing ({stripe.FIXTURES})"
    return None


def _rss_peak_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


@contextlib.contextmanager
def serve(args: list[str], env: dict[str, str], port: int, workdir: Path) -> Iterator[int]:
    """Start a server process, wait for it to answer, yield its pid, stop it."""
    log = open(workdir / f"server-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{args[0]} exited {proc.returncode}:\n"
                    + (workdir / f"server-{port}.log").read_text(errors="replace")[-3000:]
                )
            try:
                httpx.post(f"http://127.0.0.1:{port}/v1/webhooks/stripe", content=b"{}", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{args[0]} did not answer on port {port}") from None
                time.sleep(0.2)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def load(port: int, bodies: Path, secret: str, seconds: float) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            f"http://127.0.0.1:{port}/v1/webhooks/stripe",
            str(bodies),
            secret,
            f"--connections={CONNECTIONS}",
            f"--seconds={seconds}",
            f"--duplicates={DUPLICATES}",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def percentile_ms(latencies_us: list[int], q: float) -> float:
    ordered = sorted(latencies_us)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] / 1000


def webhook_rows(
    cluster: PgCluster, opts: Options, notes: list[str], handler_tps: list[float]
) -> list[Row]:
    """The end-to-end rows. `handler_tps`: handle_stripe_event from pgbench in the rounds (no
    HTTP), shown against the bare endpoint as the database's ceiling for the ratio to it."""
    missing = service_missing()
    if missing is None and not stripe.handle_stripe_event_exists(cluster, MAIN_DB):
        missing = "public.handle_stripe_event is not in the migrations yet"
    if missing is not None:
        notes.append(f"webhooks end to end skipped: {missing}")
        return [Row("webhooks end to end", str(CONNECTIONS), "ev/s", [], note="skipped")]

    secret = "whsec_bench" + secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="tb-bench-web-"))
    bodies = workdir / "bodies.jsonl"
    bodies.write_bytes(b"\n".join(stripe.deliveries(cluster, MAIN_DB, 2000)) + b"\n")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("STRIPE_", "SUPABASE_", "DATABASE_", "DB_", "PG"))
    }
    env.update(
        ENVIRONMENT="test",
        DATABASE_URL=cluster.dsn(MAIN_DB, OWNER),
        STRIPE_SECRET_KEY="sk_test_bench" + secrets.token_hex(12),
        STRIPE_WEBHOOK_SECRET=secret,
        SUPABASE_URL="http://127.0.0.1:9",
        SUPABASE_JWT_SECRET=secrets.token_hex(32),
        LOG_LEVEL="INFO",
    )
    service_port, bare_port = free_port(), free_port()
    service_cmd = [
        str(VENV_BIN / "token-billing"),
        "serve",
        "--host=127.0.0.1",
        f"--port={service_port}",
    ]
    bare_cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.bare_app:app",
        "--host=127.0.0.1",
        f"--port={bare_port}",
        "--workers=1",
        # The parser `token-billing serve` uses (token_billing.server.serving): h11, not
        # uvicorn's default httptools, so the ratio measures the service, not the parser.
        "--http=h11",
        "--no-access-log",
        "--log-level=warning",
    ]
    bare_env = {**env, "PYTHONPATH": str(ROOT)}
    service_runs: list[dict[str, Any]] = []
    bare_runs: list[dict[str, Any]] = []
    try:
        with (
            serve(service_cmd, env, service_port, workdir) as service_pid,
            serve(bare_cmd, bare_env, bare_port, workdir),
        ):
            for index in range(opts.rounds):
                order = ["bare", "service"] if index % 2 == 0 else ["service", "bare"]
                for name in order:
                    if name == "bare":
                        bare_runs.append(load(bare_port, bodies, secret, opts.seconds))
                    else:
                        service_runs.append(load(service_port, bodies, secret, opts.seconds))
            rss = _rss_peak_mib(service_pid)
            if opts.profile:
                # One more run under py-spy, after the measured ones (sampling costs CPU).
                raw = workdir / "py-spy.txt"
                spy = pyspy.record(service_pid, opts.seconds, raw)
                if spy is None:
                    print("py-spy is not installed: no profile of the service", file=sys.stderr)
                else:
                    load(service_port, bodies, secret, opts.seconds)
                    spy.wait(timeout=opts.seconds + 30)
                    print(pyspy.summary(raw), file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def rate(run: dict[str, Any]) -> float:
        return float(run["requests"]) / float(run["seconds"])

    statuses: dict[str, int] = {}
    for run in service_runs:
        for code, count in run["statuses"].items():
            statuses[code] = statuses.get(code, 0) + count
    notes.append(
        "webhooks: HTTP statuses of the service "
        + ", ".join(f"{code}: {count}" for code, count in sorted(statuses.items()))
        + f"; {sum(r['duplicates_sent'] for r in service_runs)} duplicate deliveries sent; "
        f"stored events by outcome: {stripe.outcomes(cluster, MAIN_DB)}"
    )
    ok = [rate(r) * r["statuses"].get("200", 0) / max(1, r["requests"]) for r in service_runs]
    clients = str(CONNECTIONS)

    def latency(q: float, runs: list[dict[str, Any]]) -> list[float]:
        return [percentile_ms(r["latencies_us"], q) for r in runs]

    def bare(q: float) -> str:
        return f"(bare: {statistics.median(latency(q, bare_runs)):.2f} ms)"

    return [
        Row("webhooks end to end, events/s (HTTP 200)", clients, "ev/s", ok, op=">=", target=1000),
        Row("webhooks end to end, p50 latency", clients, "ms", latency(50, service_runs), bare(50)),
        Row(
            "webhooks end to end, p99 latency",
            clients,
            "ms",
            latency(99, service_runs),
            bare(99),
            op="<=",
            target=50,
        ),
        Row(
            "webhooks end to end vs bare Starlette endpoint",
            clients,
            "req/s",
            [rate(r) for r in service_runs],
            "bare",
            [rate(r) for r in bare_runs],
            ">=",
            0.25,
        ),
        Row(
            "handle_stripe_event alone (pgbench, 8 clients, no HTTP) vs bare endpoint: the "
            "database's ceiling for the ratio above (measured minutes apart)",
            "8",
            "ev/s",
            handler_tps,
            "bare",
            [rate(r) for r in bare_runs],
            reference_unit="req/s",
        ),
        Row(
            "token-billing serve peak RSS",
            "-",
            "MiB",
            [rss],
            op="<=",
            target=150,
        ),
    ]
