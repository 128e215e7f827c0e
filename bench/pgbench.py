"""Run pgbench against the bench cluster and read what it prints.

Every workload of the bench is a pgbench custom script (bench/scripts/*.sql) run with prepared
statements, so the client costs next to nothing and every design is measured through the same
driver. Scripts of the token-billing functions and of the references connect the way the Data
API does: log in as `authenticator`, act as `service_role` (PGOPTIONS `-c role=service_role`).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scripts.pgcluster import PgCluster

SCRIPTS = Path(__file__).resolve().parent / "scripts"

# How the API reaches the database: the login role PostgREST uses, acting as service_role.
API_LOGIN = "authenticator"
API_ROLE = "service_role"


class PgbenchError(RuntimeError):
    """pgbench failed or a client aborted: the numbers of that run mean nothing."""


@dataclass
class Run:
    """One pgbench run: throughput, and per-transaction latencies when they were logged."""

    label: str
    clients: int
    seconds: float
    tps: float
    processed: int
    failed: int
    latencies_us: list[int] = field(default_factory=list)

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile (0..100) of the logged latencies, in milliseconds."""
        if not self.latencies_us:
            raise ValueError(f"{self.label}: latencies were not logged")
        ordered = sorted(self.latencies_us)
        index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        return ordered[index] / 1000

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99)

    @property
    def mean_latency_ms(self) -> float:
        return statistics.fmean(self.latencies_us) / 1000


def pgbench_binary(cluster: PgCluster) -> str:
    candidate = cluster.bindir / "pgbench"
    return str(candidate) if candidate.exists() else "pgbench"


def run_script(
    cluster: PgCluster,
    dbname: str,
    script: str | Path,
    *,
    clients: int,
    seconds: float,
    label: str | None = None,
    log_latencies: bool = False,
    as_api: bool = True,
    builtin: str | None = None,
    defines: Mapping[str, int | str] | None = None,
    search_path: str | None = None,
) -> Run:
    """Run one pgbench script (a name in bench/scripts, or a path) for `seconds`.

    `as_api`: connect as authenticator acting as service_role; otherwise as the superuser.
    `builtin`: run a built-in pgbench script instead (e.g. "tpcb-like").
    `defines`: pgbench variables (`-D name=value`), e.g. the range of accounts a script draws.
    `search_path`: the sessions' search_path (for a reference whose functions rely on it).
    """
    args = [
        pgbench_binary(cluster),
        "--no-vacuum",
        "--protocol=prepared",
        f"--client={clients}",
        f"--jobs={min(clients, os.cpu_count() or 1, 4)}",
        f"--time={max(1, round(seconds))}",
        f"--host={cluster.host}",
        f"--port={cluster.port}",
        f"--username={API_LOGIN if as_api else cluster.superuser}",
    ]
    for variable, value in (defines or {}).items():
        args.append(f"--define={variable}={value}")
    if builtin is not None:
        args.append(f"--builtin={builtin}")
        name = builtin
    else:
        path = Path(script)
        if not path.is_absolute() and not path.exists():
            path = SCRIPTS / f"{script}.sql"
        args.append(f"--file={path}")
        name = path.stem
    env = dict(os.environ)
    env.pop("PGPASSWORD", None)
    options = []
    if as_api:
        options.append(f"-c role={API_ROLE}")
    if search_path is not None:
        options.append(f"-c search_path={search_path}")
    if options:
        env["PGOPTIONS"] = " ".join(options)
    with tempfile.TemporaryDirectory(prefix="tb-pgbench-") as logdir:
        if log_latencies:
            args += ["--log", f"--log-prefix={logdir}/tx"]
        args.append(dbname)
        proc = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0 or "aborted" in output:
            raise PgbenchError(f"pgbench {name} ({clients} clients) failed:\n{output[-3000:]}")
        latencies = _read_logs(Path(logdir)) if log_latencies else []
    return Run(
        label=label or name,
        clients=clients,
        seconds=seconds,
        tps=_number(output, r"^tps = ([0-9.]+)"),
        processed=int(_number(output, r"number of transactions actually processed: (\d+)")),
        failed=int(_number(output, r"number of failed transactions: (\d+)", default=0)),
        latencies_us=latencies,
    )


def _number(output: str, pattern: str, default: float | None = None) -> float:
    match = re.search(pattern, output, re.M)
    if match is None:
        if default is not None:
            return default
        raise PgbenchError(f"pgbench printed no {pattern!r}:\n{output[-3000:]}")
    return float(match[1])


def _read_logs(logdir: Path) -> list[int]:
    """Latencies (microseconds, 3rd field) from pgbench's per-transaction logs."""
    latencies: list[int] = []
    for log in sorted(logdir.glob("tx.*")):
        for line in log.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                latencies.append(int(fields[2]))
    return latencies


def init_tpcb(cluster: PgCluster, dbname: str, scale: int) -> None:
    """`pgbench -i` in its own database: the machine's yardstick."""
    args = [
        pgbench_binary(cluster),
        "--initialize",
        "--quiet",
        f"--scale={scale}",
        f"--host={cluster.host}",
        f"--port={cluster.port}",
        f"--username={cluster.superuser}",
        dbname,
    ]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PgbenchError(f"pgbench -i failed:\n{proc.stdout}{proc.stderr}")
