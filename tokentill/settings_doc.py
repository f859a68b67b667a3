"""docs/configuration.md, written from `Settings` itself: every field, its environment
variable, its type, its default, and the comment above it in tokentill/settings.py, so
the page cannot drift from the code (tests/test_settings_doc.py fails when it is stale;
`make docs` rewrites it)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from tokentill import settings as settings_module
from tokentill.settings import Settings

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
_FLAGS = {"db": "--db", "upstream": "--upstream", "host": "--host", "port": "--port",
          "prices_file": "--prices"}  # fmt: skip
_HEAD = """# Configuration

<!-- Generated from tokentill/settings.py by `make docs`: edit the settings, not this. -->

One typed settings object (`tokentill/settings.py`, `Settings`), built once at start from
the command line's flags, then `TOKENTILL_*` environment variables, then these
defaults; a bad value is refused at start with a message naming it. Durations are in
seconds. Lists are JSON (`TOKENTILL_ROLLUP_TAG_KEYS='["team","customer"]'`).

| setting | environment (flag) | type | default | what it is |
| --- | --- | --- | --- | --- |
"""


def _comments() -> dict[str, str]:
    """Each field's comment: the block of `#` lines above it, which also covers the
    fields that follow it up to the next blank line (a group of related settings)."""
    source = inspect.getsource(settings_module)
    lines = source.splitlines()
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.ClassDef) and node.name == "Settings"):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            row = item.lineno - 2
            # Up through the group's fields (and their continuation lines) to its comment.
            while row >= 0 and lines[row].strip() and not lines[row].strip().startswith("#"):
                row -= 1
            block: list[str] = []
            while row >= 0 and lines[row].strip().startswith("#"):
                block.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            if block:
                found[item.target.id] = " ".join(block)
    return found


def _type(info: FieldInfo) -> str:
    text = str(info.annotation).replace("typing.", "").replace("pathlib.", "")
    text = text.replace("pydantic.types.", "").replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "None").replace("decimal.", "")


def _default(info: FieldInfo) -> str:
    value: Any = info.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "`" + ", ".join(str(v) for v in value) + "`" if value else "empty"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    comments = _comments()
    rows = []
    for name, info in Settings.model_fields.items():
        env = f"`TOKENTILL_{name.upper()}`"
        if name in _FLAGS:
            env += f" (`{_FLAGS[name]}`)"
        rows.append(
            f"| `{name}` | {env} | {_cell(_type(info))} | {_cell(_default(info))} | "
            f"{_cell(comments.get(name, ''))} |"
        )
    return _HEAD + "\n".join(rows) + "\n"


def main() -> None:
    PAGE.write_text(render(), "utf-8")
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
