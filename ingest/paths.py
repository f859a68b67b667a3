"""One spelling per path: what is metered is what is forwarded.

An upstream (or a gateway in front of it) may normalise `/v1//responses/` to
`/v1/responses`; if tokentill classified the raw spelling it would forward a billable
call unmetered. So every `/v1` path is made canonical first, classified, and forwarded
in that canonical form:

- percent-encoded unreserved characters (letters, digits, `-._~`) are decoded, other
  escapes keep their character with upper-case hex;
- runs of `/` become one, a trailing `/` is dropped;
- `.` and `..` segments are resolved.

A path that cannot be made canonical safely is refused (OpenAI's 404, never
forwarded): an encoded `/` or `\\` (`%2F`, `%5C`), a literal `\\`, NUL or another control
character, a malformed escape, or dot segments that leave `/v1`.
"""

from __future__ import annotations

import re
import string

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORBIDDEN_ESCAPES = frozenset({"2F", "5C", "00"})


class NonCanonicalPath(ValueError):
    """The path cannot be made canonical safely."""


def canonical_path(raw: str) -> str:
    """The canonical spelling of `raw` (the request target's path, still percent-encoded)."""
    if (
        raw.startswith("/v1/")
        and raw.isprintable()
        and raw.isascii()
        and "%" not in raw
        and "//" not in raw
        and "/." not in raw
        and "\\" not in raw
        and not raw.endswith("/")
    ):
        return raw  # already canonical: what nearly every client sends
    if "\\" in raw or any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise NonCanonicalPath("a backslash or a control character")
    if _BAD_ESCAPE.search(raw):
        raise NonCanonicalPath("a malformed percent escape")

    def decode(match: re.Match[str]) -> str:
        hex_digits = match[1].upper()
        if hex_digits in _FORBIDDEN_ESCAPES or int(hex_digits, 16) < 0x20:
            raise NonCanonicalPath(f"the escape %{hex_digits}")
        char = chr(int(hex_digits, 16))
        return char if char in _UNRESERVED else "%" + hex_digits

    decoded = _ESCAPE.sub(decode, raw) if "%" in raw else raw
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise NonCanonicalPath("dot segments above the root")
            segments.pop()
            continue
        segments.append(segment)
    canonical = "/" + "/".join(segments)
    if canonical != "/v1" and not canonical.startswith("/v1/"):
        raise NonCanonicalPath("a path outside /v1")
    return canonical
