"""Imports follow the flow: ingest -> warehouse -> api -> dashboards, the composition root
(`tokentill/`) above them all (`ALLOWED` says what each layer may import): the proxy
writes into and prices with the warehouse, the API reads the warehouse, the dashboards
read the API; the warehouse imports neither the proxy nor the API, the API not the
proxy, and nothing imports the composition root.

Arrows still running back are listed in `KNOWN`, each with why; the test fails on any
new one, and on a listed one that is gone (so the list only shrinks)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What each layer may import besides itself. The warehouse (storage, prices, the event
# contract, pure pipelines) is the bottom; the proxy and the API both stand on it and
# never on each other; the dashboards stand on the API; the composition root on all.
ALLOWED: dict[str, frozenset[str]] = {
    "warehouse": frozenset(),
    "ingest": frozenset({"warehouse"}),
    "api": frozenset({"warehouse"}),
    "dashboards": frozenset({"warehouse", "api"}),
    "tokentill": frozenset({"warehouse", "ingest", "api", "dashboards"}),
}
# (importing module, imported module): why it still runs back (issue 17).
KNOWN: dict[tuple[str, str], str] = {}
# The fake upstream and the demo are tools beside the product, above everything.
TOOLS = ("tokentill/fakeai/", "tokentill/demo.py")


LAYERS = ("ingest", "warehouse", "api", "dashboards")


def _layer(module: str) -> str | None:
    """`tokentill.ingest.proxy` is in the ingest layer, `tokentill.app` in the root."""
    parts = module.split(".")
    if parts[0] != "tokentill":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "tokentill"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _sources(layer: str) -> list[Path]:
    """The layer's files, each once: the root's own, not the layers symlinked inside it."""
    return sorted(
        path
        for path in (ROOT / layer).rglob("*.py")
        if layer != "tokentill" or path.relative_to(ROOT / layer).parts[0] not in LAYERS
        # Not a hidden directory's (an environment a test made: not our source).
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
    )


def backward_imports() -> set[tuple[str, str]]:
    backward = set()
    for layer, allowed in ALLOWED.items():
        for path in _sources(layer):
            name = path.relative_to(ROOT).as_posix()
            if name.startswith(TOOLS):
                continue
            for module in _imports(path):
                target = _layer(module)
                if target is not None and target != layer and target not in allowed:
                    backward.add((name, module))
    return backward


def test_imports_follow_the_flow() -> None:
    backward = backward_imports()
    new = sorted(backward - KNOWN.keys())
    assert new == [], f"imports against the flow: {new}"
    gone = sorted(KNOWN.keys() - backward)
    assert gone == [], f"fixed: remove them from KNOWN: {gone}"


def test_the_warehouse_imports_no_ingest_the_api_no_ingest_ingest_no_composition_root() -> None:
    """The arrows issue 17 named first are gone for good (never allowed in KNOWN)."""
    for importer, module in backward_imports():
        assert not (importer.startswith("warehouse/") and module.startswith("ingest")), importer
        assert not (importer.startswith("api/") and module.startswith("ingest")), importer
        assert not (importer.startswith("ingest/") and module.startswith("tokentill")), importer


def test_one_import_name() -> None:
    """Every module, test and bench imports the layers as `tokentill.<layer>`: the bare
    names do not exist once installed (tests/test_packaging.py builds the wheel)."""
    bare = sorted(
        (path.relative_to(ROOT).as_posix(), module)
        for folder in (*ALLOWED, "tests", "bench")
        for path in _sources(folder)
        for module in _imports(path)
        if module.split(".")[0] in LAYERS
    )
    assert bare == []


_SQL_CALLS = frozenset({"execute", "executemany", "sql", "query_frame", "fetch_one"})


def _sql_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _SQL_CALLS:
                found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {name}")
    return found


def test_the_api_and_the_dashboard_ask_the_warehouse_and_hold_no_sql() -> None:
    """The storage seam (warehouse/storage.py): every query is a function of warehouse/,
    so a second backend changes warehouse/ alone, never the API or the dashboard."""
    calls = [
        call for layer in ("api", "dashboards") for p in _sources(layer) for call in _sql_calls(p)
    ]
    assert calls == []
