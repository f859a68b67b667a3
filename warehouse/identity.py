"""Who an end user is: one id per person, however the client spells it.

Every end-user id (the `X-Tokentill-User` header, the body's `user` or
`safety_identifier`) is read the same way:
- the header is UTF-8 (not latin-1): bytes that are not UTF-8 are refused;
- Unicode NFC, so `é` typed two ways is one user;
- white space (tabs and newlines included) and invisible format characters (zero-width
  space, BOM...) are trimmed from both ends;
- control characters (C0, DEL, C1) left after that are refused, anywhere in the id;
- with `user_id_case_fold`, case is folded too (`QA-Alice` is `qa-alice`);
- an id empty after that, or longer than 256 characters, is refused.
A refused id is a 400 in OpenAI's shape (`invalid_end_user`), recorded as an error row.
"""

from __future__ import annotations

import unicodedata
from typing import Final

MAX_USER_ID: Final = 256


class BadUserId(ValueError):
    """The id cannot be an end user's."""


def decode_header(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadUserId("is not UTF-8") from None


def end_user_id(raw: str, *, case_fold: bool = False) -> str:
    """The canonical spelling of an end user's id (see the module docstring)."""
    text = unicodedata.normalize("NFC", raw)
    start, end = 0, len(text)
    while start < end and _trimmed(text[start]):
        start += 1
    while end > start and _trimmed(text[end - 1]):
        end -= 1
    text = text[start:end]
    for char in text:
        if unicodedata.category(char) == "Cc":
            raise BadUserId(f"has a control character (U+{ord(char):04X})")
    if case_fold:
        text = unicodedata.normalize("NFC", text.casefold())
    if not text:
        raise BadUserId("is empty")
    if len(text) > MAX_USER_ID:
        raise BadUserId(f"is longer than {MAX_USER_ID} characters")
    return text


def _trimmed(char: str) -> bool:
    return char.isspace() or unicodedata.category(char) == "Cf"
