"""Running the fake upstream as a server (``tokentill fake-upstream --port N``)."""

from __future__ import annotations

import logging

import uvicorn

from tokentill.fakeai.app import create_fake_app
from tokentill.fakeai.wire import OPENAI, Wire

_CUT_MESSAGE = "ASGI callable returned without completing response."


class _DeliberateCuts(logging.Filter):
    """Drop uvicorn's complaint about the ``cut`` scenario's unfinished answers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _CUT_MESSAGE


def run_fake_upstream(
    host: str, port: int, *, seed: int | None = None, wire: Wire = OPENAI
) -> None:
    """Serve a fresh fake OpenAI API on ``host:port`` under uvicorn until interrupted."""
    config = uvicorn.Config(
        create_fake_app(seed=seed, wire=wire),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    logging.getLogger("uvicorn.error").addFilter(_DeliberateCuts())
    uvicorn.Server(config).run()
