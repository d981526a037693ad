"""The errors a request handler raises: `RequestError` (a client mistake, answered with the OpenAI error JSON and
its status) and `ClientDisconnected`. Their own module so that the request checks (`limits.py`) and the endpoints
share them without importing each other."""

from __future__ import annotations

from typing import Any


def printable(text: str) -> str:
    """`text` with lone surrogates escaped, so that it can always be encoded (JSON, logs) — an error message
    may quote what the client sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class RequestError(Exception):
    """A client mistake, answered with the OpenAI error JSON and `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        message, param = printable(message), None if param is None else printable(param)
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; the request was aborted, no one is left to answer."""
