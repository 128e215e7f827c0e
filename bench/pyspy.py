"""py-spy on the service during a webhook run (`make bench BENCH_ARGS=--profile`).

Records the `token-billing serve` process while the load generator runs, then prints the frames
with the largest inclusive share of the samples (a frame counts once per sample however deep it
recurses). This is how the pool's per-checkout round trip and the per-request SQL composition
were found.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def binary() -> str | None:
    return shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Start sampling `pid` for `seconds` (raw collapsed stacks into `out`); None without py-spy."""
    exe = binary()
    if exe is None:
        return None
    duration = str(max(1, int(seconds)))
    return subprocess.Popen(
        [exe, "record", "-p", str(pid), "-d", duration, "-r", "200", "-f", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def frame(text: str) -> str:
    """`function (path/file.py:line)` without the line: one key per function."""
    name, _, where = text.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summary(raw: Path, limit: int = 45) -> str:
    """The `limit` frames with the largest inclusive share of the samples."""
    total = 0
    inclusive: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        inclusive.update(dict.fromkeys({frame(f) for f in stack.split(";")}, samples))
    if total == 0:
        return "py-spy: no samples"
    lines = [f"py-spy: {total} samples of the service; inclusive share of the top frames:"]
    lines += [f"{100 * n / total:5.1f}%  {key}" for key, n in inclusive.most_common(limit)]
    return "\n".join(lines)
