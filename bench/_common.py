"""Helpers shared by the benchmarks: loopback servers as subprocesses, wrk, /proc readers.

Nothing here imports the project: the benchmarks drive tokentill from outside, the way
an operator would, and read the kernel's view of its cost. The cluster's tests share the
PostgreSQL helper (tests/services.py).
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Something broke (not a slow figure): the benchmark's result would be meaningless."""


# -- ports and plain HTTP ----------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One request on a fresh connection (stdlib only; no proxy env vars honoured)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def prometheus_value(text: str, name: str) -> float:
    """The sum of all samples of metric `name` (any labels) in a /metrics page."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    for match in pattern.finditer(text):
        total += float(match.group(1))
    return total


# -- servers as subprocesses ---------------------------------------------------------------


@dataclass
class Server:
    """A server started as a subprocess, its output going to a log file."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} is not running")
        return self.proc.pid

    def start(self, env: dict[str, str] | None = None) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.name} exited (code {code}); log:\n{self.log_tail()}")

    def wait_port(self, timeout: float = 30.0) -> None:
        """Until something accepts connections on the port."""
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not open port {self.port} in {timeout:.0f}s")
            time.sleep(0.05)

    def wait_http(self, path: str, timeout: float = 30.0) -> None:
        """Until `GET path` answers 200."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            self.check_alive()
            try:
                status, body = http_request(self.port, "GET", path, timeout=1.0)
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: GET {path} not 200 after {timeout:.0f}s ({last})")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it hangs. Return the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def fake_upstream_server(workdir: Path) -> Server:
    """`tokentill fake-upstream` on a free port (started by the caller)."""
    port = free_port()
    argv = python_module_argv("-m", "tokentill", "fake-upstream", "--port", str(port))
    return Server("fake upstream", argv, port, workdir / "fake.log")


# -- PostgreSQL -------------------------------------------------------------------------
# A throwaway cluster in a temporary directory (initdb, trust auth, loopback, a free
# port), for the cluster's tests and its benchmark. `make test` installs Debian's
# postgresql package when it is missing; this only finds and starts it. PostgreSQL
# refuses to run as root, so as root the cluster belongs to the `postgres` user the
# package creates.


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


@dataclass
class Redis:
    """A throwaway redis-server (Debian's), as the quota counters want it: no snapshots,
    no append-only file, no eviction (a restart comes back empty, never stale)."""

    port: int
    data: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RuntimeError("redis-server is not installed: run `make test`")
        command = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", ""]
        command += ["--appendonly", "no", "--maxmemory-policy", "noeviction"]
        command += ["--dir", str(self.data), "--protected-mode", "no"]
        with open(self.data / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.data / "redis.log").read_text()[-2000:])
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def redis_server() -> Iterator[Redis]:
    root = Path(tempfile.mkdtemp(prefix="tokentill-redis-"))
    server = Redis(free_port(), root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def python_module_argv(*args: str) -> list[str]:
    """`python -m ...` with this interpreter, so the PID is the server itself."""
    return [sys.executable, *args]


def make_workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- /proc ---------------------------------------------------------------------------------


def _stat_fields(path: Path) -> list[str]:
    raw = path.read_text()
    # The command name is in parentheses and may contain spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process: /proc/PID/stat sums all its threads, including
    those that have exited, which reading /proc/PID/task/* alone would miss."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def main_thread_cpu_seconds(pid: int) -> float:
    """utime + stime of the process's main thread (for an asyncio server: its event loop)."""
    fields = _stat_fields(Path(f"/proc/{pid}/task/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Per live thread: tid -> (name, utime + stime seconds)."""
    result: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            name = (task / "comm").read_text().strip()
            fields = _stat_fields(task / "stat")
            result[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return result


def proc_status_kb(pid: int, key: str) -> int:
    """A `kB` field of /proc/PID/status, e.g. VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


def rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmHWM") / 1024


# -- wrk -----------------------------------------------------------------------------------

WRK = "/usr/bin/wrk"


def find_wrk() -> str:
    path = shutil.which("wrk") or (WRK if Path(WRK).exists() else None)
    if path is None:
        raise BenchError("wrk is not installed (Debian: apt-get install wrk; `make bench` does)")
    return path


@dataclass
class WrkResult:
    connections: int
    requests: int  # completed responses, any status
    non_2xx: int
    socket_errors: dict[str, int]
    duration_s: float
    rps: float
    latency_ms: dict[float, float] = field(default_factory=dict)  # percentile -> ms
    output: str = ""

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values())

    @property
    def p50(self) -> float:
        return self.latency_ms[50.0]

    @property
    def p99(self) -> float:
        return self.latency_ms[99.0]


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(output: str, connections: int) -> WrkResult:
    """Parse `wrk --latency` output: the Latency Distribution, counts and Requests/sec."""
    latency: dict[float, float] = {}
    in_distribution = False
    for line in output.splitlines():
        if "Latency Distribution" in line:
            in_distribution = True
            continue
        if in_distribution:
            match = re.match(r"^\s+([\d.]+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", line)
            if match is None:
                in_distribution = False
            else:
                latency[float(match.group(1))] = _to_ms(match.group(2), match.group(3))
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(ms|s|m|h)", output, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if total is None or rps is None or 50.0 not in latency or 99.0 not in latency:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
        if sock
        else {}
    )
    return WrkResult(
        connections=connections,
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
        duration_s=float(total.group(2)) * _UNITS_S[total.group(3)],
        rps=float(rps.group(1)),
        latency_ms=latency,
        output=output,
    )


def run_wrk(
    url: str,
    script: Path,
    *,
    connections: int,
    duration_s: float,
    threads: int = 1,
    timeout_s: float = 10.0,
) -> WrkResult:
    """`wrk -t{threads} -c{connections} -d{duration}s --latency -s script url`."""
    threads = max(1, min(threads, connections))
    argv = [
        find_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, math.ceil(duration_s))}s",
        f"--timeout={max(1, math.ceil(timeout_s))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + timeout_s + 30, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr}\n{done.stdout}")
    return parse_wrk(done.stdout, connections)


def lua_string(value: str) -> str:
    """A Lua string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def wrk_post_script(
    path: str, bodies: Sequence[str], headers: dict[str, str], destination: Path
) -> Path:
    """A wrk Lua script POSTing `bodies` to `path` in turn. The requests are formatted once
    in `init`, so wrk's Lua costs next to nothing per request."""
    header_table = ", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items())
    body_list = ",\n  ".join(lua_string(b) for b in bodies)
    destination.write_text(
        f"""-- generated by bench/_common.py
local bodies = {{
  {body_list}
}}
local requests = {{}}
local n = 0

function init(args)
  for i, body in ipairs(bodies) do
    requests[i] = wrk.format("POST", {lua_string(path)}, {{{header_table}}}, body)
  end
end

function request()
  n = n % #requests + 1
  return requests[n]
end
"""
    )
    return destination


# -- figures -------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
