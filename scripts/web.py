"""Build and type-check the browser example in examples/web with the pinned npm tools.

    python -m scripts.web            # bundle examples/web/main.ts into examples/web/dist (esbuild)
    python -m scripts.web --check    # tsc --noEmit over examples/web (the real supabase-js types)

The bundle is a build output (gitignored): `make web` runs this, and `make dev`, `make test` and
the browser tests build it when it is older than its sources. supabase-js is bundled from npm
into a chunk of its own that the page loads only when Supabase Realtime is configured.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "examples" / "web"
DIST = WEB / "dist"
ENTRY = WEB / "main.ts"
BUNDLE = DIST / "main.js"
BIN = ROOT / "node_modules" / ".bin"


class WebBuildError(RuntimeError):
    """esbuild or tsc failed, or is not installed; the message carries their output."""


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        raise WebBuildError(f"{path} is missing: run `npm ci` (scripts/bootstrap.sh does)")
    return path


def _sources() -> list[Path]:
    return [p for p in WEB.glob("*.ts") if p.is_file()]


def up_to_date() -> bool:
    """True when the bundle exists and is newer than every TypeScript source."""
    if not BUNDLE.exists():
        return False
    built = BUNDLE.stat().st_mtime
    return all(src.stat().st_mtime <= built for src in _sources())


def build(*, force: bool = False) -> bool:
    """Bundle the page unless it is up to date; True when it ran esbuild."""
    if not force and up_to_date():
        return False
    proc = subprocess.run(
        [
            str(_tool("esbuild")),
            str(ENTRY),
            "--bundle",
            "--format=esm",
            "--splitting",
            "--target=es2020",
            "--minify",
            "--sourcemap",
            "--log-level=warning",
            f"--outdir={DIST}",
            "--entry-names=[name]",
            "--chunk-names=chunks/[name]-[hash]",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )
    if proc.returncode != 0:
        raise WebBuildError(f"esbuild failed:\n{proc.stdout}{proc.stderr}")
    BUNDLE.touch()  # newer than its sources even when esbuild left it unchanged
    return True


def typecheck() -> subprocess.CompletedProcess[str]:
    """`tsc --noEmit -p examples/web`; the caller reads returncode and output."""
    return subprocess.run(
        [str(_tool("tsc")), "--noEmit", "--pretty", "false", "-p", str(WEB / "tsconfig.json")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build or type-check examples/web.")
    parser.add_argument("--check", action="store_true", help="run tsc --noEmit instead")
    parser.add_argument("--force", action="store_true", help="bundle even when up to date")
    args = parser.parse_args(argv)
    try:
        if args.check:
            proc = typecheck()
            sys.stdout.write(proc.stdout + proc.stderr)
            return proc.returncode
        if build(force=args.force):
            print(f"web: bundled {BUNDLE.relative_to(ROOT)}", file=sys.stderr)
    except WebBuildError as exc:
        print(f"web: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
