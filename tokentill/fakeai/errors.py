"""OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with its status."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

INVALID_REQUEST = "invalid_request_error"

_NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field "
    "(with blank username) if you're accessing the API from your browser and are prompted for "
    "a username. You can obtain an API key from https://platform.openai.com/account/api-keys."
)
_BAD_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please contact "
    "us through our help center at help.openai.com.)"
)
_SERVER_ERROR_MESSAGE = (
    "The server had an error while processing your request. Sorry about that! You can retry "
    "your request, or contact us through our help center at help.openai.com if the error "
    "persists."
)


@dataclass
class OpenAIError(Exception):
    """An HTTP error answer, raised anywhere in a handler and rendered by the app."""

    status: int
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.status, self.message)

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


def redact_key(key: str) -> str:
    """How OpenAI echoes a rejected key: a short prefix, stars, the last four characters."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:6] + "*" * min(len(key) - 10, 40) + key[-4:]


def no_api_key() -> OpenAIError:
    return OpenAIError(401, _NO_KEY_MESSAGE)


def invalid_api_key(key: str) -> OpenAIError:
    message = (
        f"Incorrect API key provided: {redact_key(key)}. You can find your API key at "
        "https://platform.openai.com/account/api-keys."
    )
    return OpenAIError(401, message, code="invalid_api_key")


def invalid_json() -> OpenAIError:
    return OpenAIError(400, _BAD_JSON_MESSAGE)


def missing_parameter(param: str) -> OpenAIError:
    return OpenAIError(
        400,
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def invalid_type(
    param: str, expected: str, got: str, *, report_param: str | None = None
) -> OpenAIError:
    return OpenAIError(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {got} instead.",
        param=report_param or param,
        code="invalid_type",
    )


def invalid_value(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def rate_limited(model: str, requested: int) -> OpenAIError:
    message = (
        f"Rate limit reached for {model} in organization org-fakeupstream on tokens per min "
        f"(TPM): Limit 30000000, Used 30000000, Requested {requested}. Please try again in 1s. "
        "Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    headers = {
        "retry-after": "1",
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-limit-tokens": "30000000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-requests": "6ms",
        "x-ratelimit-reset-tokens": "1s",
    }
    return OpenAIError(429, message, type="tokens", code="rate_limit_exceeded", headers=headers)


def server_error() -> OpenAIError:
    return OpenAIError(500, _SERVER_ERROR_MESSAGE, type="server_error")


def unknown_url(method: str, path: str) -> OpenAIError:
    return OpenAIError(404, f"Invalid URL ({method} {path})")


def response_not_found(response_id: str) -> OpenAIError:
    return OpenAIError(404, f"Response with id '{response_id}' not found.")


def not_cancellable() -> OpenAIError:
    return OpenAIError(400, "Only responses created with background=true can be cancelled.")


def bad_fake_header(name: str, value: str, allowed: str) -> OpenAIError:
    return OpenAIError(400, f"Invalid {name} header {value!r}: expected {allowed}.", param=name)
