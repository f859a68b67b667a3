"""Object ids in OpenAI's formats (``resp_…``, ``msg_…``, ``chatcmpl-…``, ``req_…``)."""

from __future__ import annotations

import hashlib
import os
from typing import Final

_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _hex(prefix: str) -> str:
    return prefix + os.urandom(25).hex()


def response_id() -> str:
    return _hex("resp_")


def message_id() -> str:
    return _hex("msg_")


def reasoning_id() -> str:
    return _hex("rs_")


def web_search_id() -> str:
    return _hex("ws_")


def image_generation_id() -> str:
    return _hex("ig_")


def function_call_id() -> str:
    return _hex("fc_")


def tool_call_id() -> str:
    raw = os.urandom(24)
    return "call_" + "".join(_ALPHABET[byte % len(_ALPHABET)] for byte in raw)


def file_id() -> str:
    return "file-" + os.urandom(11).hex()


def request_id() -> str:
    return "req_" + os.urandom(16).hex()


def chat_completion_id() -> str:
    raw = os.urandom(29)
    return "chatcmpl-" + "".join(_ALPHABET[byte % len(_ALPHABET)] for byte in raw)


def system_fingerprint(model: str) -> str:
    """A stable ``fp_…`` per served model, like OpenAI's backend fingerprint."""
    return "fp_" + hashlib.sha256(model.encode()).hexdigest()[:10]


def key_fingerprint(api_key: str) -> str:
    """A short non-reversible tag for an API key: ``sha256:`` + 16 hex digits.

    Same recipe as the proxy's `warehouse.events.key_fingerprint`, so rows compare directly.
    """
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
