# token-billing: every task a developer or CI runs. `make test` is what .ci/run calls; `make help`
# lists the targets with the `## ` description on each target's line.
SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV := .venv
PY := $(VENV)/bin/python
SQL_DIRS := supabase sql tests/sql
PY_DIRS := api tests scripts bench examples
# The static checks `make lint` and `make test` run.
LINTS := lint-py typecheck lint-sql

.PHONY: help test dev dev-reset lock lint lint-py lint-sql typecheck fmt bundle check-bundle pytest stress bootstrap \
	bench web dev-stop clean distclean

help: ## List the targets and what each does
	@echo "make <target>  (default: test)"
	@awk 'BEGIN { FS = ":.*## " } /^[a-z][a-z-]*:.*## / { printf "  %-14s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

bootstrap: ## Install what is missing: apt packages, .venv, node_modules (idempotent)
	@bash scripts/bootstrap.sh

# Pin the newest versions of the Python dependencies in constraints.txt (then run `make test`).
lock: ## Pin the newest Python dependency versions in constraints.txt
	@bash scripts/lock_python.sh

# Every check runs even when an earlier one fails; the exit status says whether all passed.
# pytest runs last so that its summary closes the output.
test: bootstrap web ## Every check: the linters, mypy, sqlfluff, then pytest (pgTAP included)
	@failed=""; \
	for check in $(LINTS) pytest; do \
		$(MAKE) --no-print-directory $$check || failed="$$failed $$check"; \
	done; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed" >&2; exit 1; fi

# pgTAP (via pg_prove), the bundle, `supabase db push|lint|advisors`, and the Python tests.
pytest: ## Only pytest (PYTEST_ARGS="-k ..." to narrow it)
	$(PY) -m pytest $(PYTEST_ARGS)

# The fault, storm and fuzz suites (pytest marker `stress`) at STRESS_SCALE times the size
# `make test` runs them at: Postgres restarts, killed backends, webhook storms, hostile input.
# Each prints a `reliability ...` figures line at the end (docs/reliability.md quotes them).
STRESS_SCALE ?= 10
stress: bootstrap ## The fault, storm and fuzz suites, STRESS_SCALE (default 10) times their make test size
	STRESS_SCALE=$(STRESS_SCALE) $(PY) -m pytest -m stress $(PYTEST_ARGS)

# Like `make test`, every check runs and the exit status says whether all passed.
lint: bootstrap ## The static checks: ruff, mypy, sqlfluff
	@failed=""; \
	for check in $(LINTS); do \
		$(MAKE) --no-print-directory $$check || failed="$$failed $$check"; \
	done; \
	if [ -n "$$failed" ]; then echo "make lint: FAILED:$$failed" >&2; exit 1; fi

lint-py: ## ruff check and ruff format --check
	@status=0; \
	$(PY) -m ruff check $(PY_DIRS) || status=1; \
	$(PY) -m ruff format --check $(PY_DIRS) || status=1; \
	exit $$status

typecheck: ## mypy --strict over api, tests, scripts, bench
	$(PY) -m mypy

lint-sql: ## sqlfluff over supabase/, sql/ and tests/sql/
	$(PY) -m sqlfluff lint $(SQL_DIRS)

# Rewrite what the formatters can; `make lint` then shows what needs a human.
fmt: bootstrap ## Rewrite what ruff and sqlfluff can fix, and the bundle
	$(PY) -m ruff check --fix --exit-zero --quiet $(PY_DIRS)
	$(PY) -m ruff format $(PY_DIRS)
	-$(PY) -m sqlfluff fix --quiet $(SQL_DIRS)
	$(PY) scripts/bundle_sql.py

bundle: ## Regenerate sql/token_billing.sql from supabase/migrations
	$(PY) scripts/bundle_sql.py

check-bundle: ## Fail when sql/token_billing.sql is out of date
	$(PY) scripts/bundle_sql.py --check

# The demo page's script: examples/web/*.ts bundled with esbuild into examples/web/dist (only
# when a source is newer; supabase-js comes from node_modules, never a CDN).
web: bootstrap ## Bundle the demo page's TypeScript (examples/web/dist)
	$(PY) -m scripts.web

# Benchmarks (issue 5): a throwaway cluster, the hot paths against references measured in the
# same run; prints one table and writes bench/results/latest.md (about 10 minutes).
bench: bootstrap ## The benchmarks against their references (about 10 minutes)
	$(PY) -m bench.run $(BENCH_ARGS)

# The local stack: a persistent database on port 54322 (Supabase's), migrated and seeded, and the
# service with the demo page on http://localhost:8000 (DEV_ARGS="--api-port 8001" to move it).
# Ctrl-C stops both.
dev: bootstrap web ## The local stack: Postgres on 54322 and the service on :8000
	$(PY) -m scripts.dev $(DEV_ARGS)

# The same, from an empty database (`supabase db push` never re-runs a changed seed.sql).
dev-reset: bootstrap web ## make dev from an empty database
	$(PY) -m scripts.dev --reset $(DEV_ARGS)

# Stop a stack left running by `python -m scripts.dev --no-wait`.
dev-stop: ## Stop a stack left running by `python -m scripts.dev --no-wait`
	$(PY) -m scripts.dev --stop $(DEV_ARGS)

clean: ## Stop the dev stack and remove what runs and builds leave behind
	@if [ -f .dev/pgdata/postmaster.pid ] || [ -f .dev/service.pid ]; then $(PY) -m scripts.dev --stop; fi
	rm -rf .dev examples/web/dist tests/artifacts .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info api/*.egg-info
	find . -name __pycache__ -type d -not -path './node_modules/*' -not -path './.venv/*' -prune -exec rm -rf {} +

# Also the installed tools: the next `make` reinstalls them.
distclean: clean ## clean, and the installed tools (.venv, node_modules)
	rm -rf .venv node_modules
