"""The gateway's exception family: every failure a client sees, in the OpenAI error shape."""

from __future__ import annotations

from permamesh.errors import PermameshError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 429: "insufficient_quota", 500: "api_error", 502: "api_error",
         503: "api_error", 504: "api_error"}


class GatewayError(PermameshError):
    """The gateway could not start or serve."""


class ApiError(GatewayError):
    """A request the gateway answers with an HTTP error: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "api_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
