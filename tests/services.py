"""Real PostgreSQL for the cluster's tests: a throwaway cluster in a temporary directory
(initdb, trust auth, loopback, a free port), started once per test session.

`make test` installs Debian's postgresql package when it is missing (the Makefile's
`services` target); these helpers only find and start it. PostgreSQL refuses to run as
root, so as root the cluster belongs to the `postgres` user the package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.servers import free_port


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run `make test`")
    return found


def _as_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class Postgres:
    """A running PostgreSQL: `dsn(name)` makes a fresh database and returns its URL."""

    port: int
    data: Path
    _made: int = 0

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "lake") -> str:
        self._made += 1
        name = f"{prefix}_{os.getpid()}_{self._made}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def pg_ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        subprocess.run(
            _as_owner(
                [_binary("pg_ctl"), "-D", str(self.data / "db"), "-o", options, "-w"]
                + (["-l", str(self.data / "db" / "server.log")] if action == "start" else [])
                + (["-m", "fast"] if action == "stop" else [])
                + [action]
            ),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        self.pg_ctl("stop")

    def start(self) -> None:
        self.pg_ctl("start")
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    root = Path(tempfile.mkdtemp(prefix="tokentill-pg-"))
    root.chmod(0o777)
    (root / "db").mkdir()
    if os.geteuid() == 0:
        shutil.chown(root / "db", "postgres")
    subprocess.run(
        _as_owner([_binary("initdb"), "-D", str(root / "db"), "-A", "trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
    )
    server = Postgres(free_port(), root)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
