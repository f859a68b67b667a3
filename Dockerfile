# tokentill: the metering proxy, its DuckDB warehouse and admin surfaces in one image.
#
#   docker build -t tokentill .
#   docker run -p 8787:8787 -v tokentill-data:/data tokentill
#
# Two stages: the builder resolves the locked dependencies with uv into /app/.venv;
# the runtime stage gets only that virtualenv (no uv, no build tools, no sources).

# --- builder ---------------------------------------------------------------
FROM python:3.11-slim AS builder

RUN pip install --no-cache-dir --disable-pip-version-check uv==0.13.8

# Byte-compile at build time (faster start), copy rather than hardlink out of the
# cache, and never download a Python: the image's own 3.11 is the interpreter.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app

# Dependencies first: this layer is rebuilt only when pyproject.toml or uv.lock change.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

# Then the project itself, installed non-editable so the venv is self-contained.
COPY README.md ./
COPY tokentill ./tokentill
COPY ingest ./ingest
COPY warehouse ./warehouse
COPY api ./api
COPY dashboards ./dashboards
RUN uv sync --frozen --no-dev --no-editable

# --- runtime ---------------------------------------------------------------
FROM python:3.11-slim AS runtime

RUN groupadd --system --gid 10001 tokentill \
    && useradd --system --uid 10001 --gid tokentill --create-home \
        --home-dir /home/tokentill --shell /usr/sbin/nologin tokentill \
    && mkdir -p /data \
    && chown tokentill:tokentill /data

# Same path as in the builder: the console scripts' shebangs point into it.
COPY --from=builder /app/.venv /app/.venv

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TOKENTILL_DB=/data/tokentill.duckdb \
    TOKENTILL_HOST=0.0.0.0 \
    TOKENTILL_PORT=8787

WORKDIR /data
USER 10001:10001

VOLUME /data
EXPOSE 8787

# /healthz is 503 while starting or while the writer is failing; urlopen raises on it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=4)"]

ENTRYPOINT ["tokentill"]
CMD ["serve"]
