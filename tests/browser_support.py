"""Drive headless Chromium from a test: tests/browser/driver.mjs (playwright-core) over pipes.

Debian's /usr/bin/chromium (scripts/bootstrap.sh installs it); playwright-core never downloads a
browser. Each method sends one JSON command and waits for its answer.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

from scripts.pgcluster import ROOT

DRIVER = ROOT / "tests" / "browser" / "driver.mjs"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"


def dollars(amount: int, scale: int, shown: int | None) -> str:
    """What examples/web/money.ts prints for `amount` 10^-scale dollars (scale 2: cents, 8:
    micro-cents), from Python's exact decimals rather than its algorithm: cut toward zero to
    `shown` decimals, or (None) to the last digit that is not 0, at least the cents."""
    value = abs(Decimal(amount)).scaleb(-scale)
    if shown is None:
        text = f"{value.normalize():,f}"
        whole, _, fraction = text.partition(".")
        text = f"{whole}.{fraction.ljust(2, '0')}"
    else:
        cut = value.quantize(Decimal(1).scaleb(-shown), rounding="ROUND_DOWN")
        text = f"{cut:,.{shown}f}"
    zero = all(ch in "0.," for ch in text)
    return ("\u2212" if amount < 0 and not zero else "") + "$" + text


class BrowserError(RuntimeError):
    """The driver refused a command (a wait timed out, a selector matched nothing, ...)."""


def missing_prerequisites() -> list[str]:
    """What the browser tests need and this machine lacks."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt chromium; scripts/bootstrap.sh installs it)")
    if shutil.which("node") is None:
        missing.append("node")
    if not (ROOT / "node_modules" / "playwright-core").exists():
        missing.append("node_modules/playwright-core (npm ci)")
    return missing


class Browser:
    """One page in one headless Chromium; close() (or the context manager) ends both."""

    def __init__(self, timeout: float = 30.0) -> None:
        self._timeout = timeout
        self._proc = subprocess.Popen(
            ["node", str(DRIVER)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._answers: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._ids = 0
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._answers.put(line)
        self._answers.put(None)

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line)

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        assert self._proc.stdin is not None
        self._ids += 1
        command = {"id": self._ids, "op": op, **args}
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        try:
            line = self._answers.get(timeout=timeout or self._timeout)
        except queue.Empty:
            raise BrowserError(f"no answer to {op} in time") from None
        if line is None:
            raise BrowserError("the browser driver exited:\n" + "".join(self._stderr[-30:]))
        answer = json.loads(line)
        if answer.get("id") != self._ids:
            raise BrowserError(f"out of step: asked {self._ids}, got {answer}")
        if not answer["ok"]:
            raise BrowserError(f"{op} {args}: {answer['error']}")
        return answer.get("value")

    # --- conveniences -------------------------------------------------------------------------
    def goto(self, url: str) -> str:
        return str(self.call("goto", url=url))

    def reload(self) -> str:
        return str(self.call("reload"))

    def click(self, selector: str) -> None:
        self.call("click", selector=selector)

    def press(self, key: str) -> None:
        self.call("press", key=key)

    def text(self, selector: str) -> str:
        return str(self.call("text", selector=selector))

    def fill(self, selector: str, value: str) -> None:
        self.call("fill", selector=selector, value=value)

    def count(self, selector: str) -> int:
        return int(self.call("count", selector=selector))

    def visible(self, selector: str) -> bool:
        return bool(self.call("visible", selector=selector))

    def wait_for_text(self, selector: str, pattern: str, timeout_ms: int = 5000) -> dict[str, Any]:
        value: dict[str, Any] = self.call(
            "wait_for_text",
            timeout=timeout_ms / 1000 + 10,
            selector=selector,
            pattern=pattern,
            timeout_ms=timeout_ms,
        )
        return value

    def wait_for_url(self, pattern: str, timeout_ms: int = 5000) -> str:
        return str(self.call("wait_for_url", pattern=pattern, timeout_ms=timeout_ms))

    def focused(self) -> dict[str, Any] | None:
        value: dict[str, Any] | None = self.call("focused")
        return value

    def set_session_storage(self, key: str, value: str | None) -> None:
        self.call("session_storage", key=key, value=value)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.call("screenshot", path=str(path))
        return path

    def stripe_visits(self) -> list[str]:
        return list(self.call("stripe_visits"))

    def console(self) -> list[str]:
        return list(self.call("log"))

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
