"""The text fields of a `multipart/form-data` body (image edits, audio uploads).

The proxy meters an upload by its form fields (`model`, `stream`, `user`, `n`,
`response_format`), read from the body it already holds for admission: the file
parts are skipped, never copied, and the body is forwarded untouched. A body that is
not a well-formed form gives no fields; the upstream then says what is wrong with it.
"""

from __future__ import annotations

from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

# Form fields are short; a longer one is not one the meter reads.
_FIELD_LIMIT = 4096
# Fields read as what they mean, as JSON bodies carry them.
_BOOLEANS = frozenset({"stream"})
_INTEGERS = frozenset({"n"})


def is_form(content_type: str | None) -> bool:
    return content_type is not None and content_type.lower().lstrip().startswith(
        "multipart/form-data"
    )


def form_fields(content_type: str, body: bytes) -> dict[str, Any] | None:
    """The form's text fields (the first of each name), or None if it is not a form."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        return None
    fields: dict[str, Any] = {}
    state: dict[str, Any] = {"name": None, "file": False, "data": [], "size": 0}
    header: list[bytes] = [b"", b""]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        if header[0].strip().lower() == b"content-disposition":
            _, options = parse_options_header(header[1])
            name = options.get(b"name")
            state["name"] = name.decode("utf-8", "replace") if name is not None else None
            state["file"] = b"filename" in options
        header[0], header[1] = b"", b""

    def on_part_begin() -> None:
        state.update(name=None, file=False, data=[], size=0)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["file"] or state["size"] > _FIELD_LIMIT:
            return  # a file's bytes are never copied
        state["size"] += end - start
        state["data"].append(data[start:end])

    def on_part_end() -> None:
        name = state["name"]
        if name is None or state["file"] or state["size"] > _FIELD_LIMIT or name in fields:
            return
        text = b"".join(state["data"]).decode("utf-8", "replace")
        fields[name] = _typed(name, text)

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError:
        return None
    return fields


def _typed(name: str, text: str) -> Any:
    if name in _BOOLEANS:
        return text.strip().lower() == "true"
    if name in _INTEGERS:
        try:
            return int(text)
        except ValueError:
            return text
    return text
