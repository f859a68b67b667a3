# Two commands do everything from a fresh clone: `make run` and `make test`.
# Only python3 (3.11+) and make are assumed; uv is bootstrapped into .tools/ if missing.
SHELL := /bin/bash
UV_VERSION := 0.13.8
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --frozen
SRC := tokentill ingest warehouse api dashboards  # ruff walks the real folders, not the links

.PHONY: run demo test lint typecheck pytest bench bench-rollup bench-api bench-cluster bench-chaos bench-sinks sync fake-upstream chromium postgresql redis screenshots bench-dashboard docs

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

sync: $(if $(findstring .tools,$(UV)),.tools/bin/uv)
	$(UV) sync --frozen --quiet

run: sync  ## the service on its embedded defaults (127.0.0.1:8787, data/, api.openai.com)
	$(RUN) tokentill serve

demo: sync  ## the service in front of the fake upstream, with traffic
	$(RUN) tokentill demo

fake-upstream: sync
	$(RUN) tokentill fake-upstream --port 8788

test: lint typecheck pytest

lint: sync
	$(RUN) ruff check $(SRC) tests bench
	$(RUN) ruff format --check $(SRC) tests bench

typecheck: sync
	$(RUN) mypy

pytest: sync chromium postgresql redis
	$(RUN) pytest -q $(PYTEST_ARGS)

# The dashboard's browser tests drive Debian's Chromium through Playwright (a Python
# package from uv.lock); Playwright never downloads a browser of its own.
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The cluster's tests start a throwaway PostgreSQL of their own (tests/services.py) from
# Debian's server package, installed here when missing.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null)

# Shared quota counters' tests start a throwaway redis-server (Debian's redis-server).
redis:
	@test -x /usr/bin/redis-server || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

docs: sync  ## rewrite docs/configuration.md from tokentill/settings.py
	$(RUN) python -m tokentill.settings_doc

screenshots: sync chromium  ## refresh the dashboard screenshots in docs/ (the browser tests, then the demo's overview)
	TOKENTILL_SCREENSHOTS=docs $(RUN) pytest -q tests/test_dashboard.py tests/test_demo.py

bench: sync  ## needs wrk (Debian package), installed here if missing
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
	$(RUN) python bench/proxy.py

bench-rollup: sync  ## 10M synthetic events: full rebuild, incremental run, peak memory
	$(RUN) python bench/rollup.py

bench-chaos: sync  ## kill -9 every 50 s, 8 times, under traffic: billed but unrecorded tokens
	$(RUN) python -m bench.chaos

bench-cluster: sync postgresql redis  ## proxies on a DuckLake (1, 2, 3) against the one process on its file
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null)
	$(RUN) python -m bench.cluster

bench-sinks: sync  ## billing sinks' events/s (CloudEvents, Stripe) against reading and pricing alone
	$(RUN) python bench/sinks.py

bench-api: sync  ## the admin API's p50/p95 on the 10M-event warehouse, against DuckDB alone
	$(RUN) python bench/api.py

bench-dashboard: sync  ## the dashboard's page times on a warehouse: make bench-dashboard DB=path
	$(RUN) python bench/dashboard.py --db $(DB)
