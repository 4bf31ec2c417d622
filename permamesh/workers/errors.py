"""The workers package's exception family."""

from __future__ import annotations

from permamesh.errors import PermameshError


class WorkerError(PermameshError):
    """Base of every error the workers package raises on purpose."""


class ModelError(WorkerError):
    """A model could not be found, converted or loaded."""


class RequestError(WorkerError):
    """A request cannot be served (prompt too long for the model, wrong model...)."""


class ContextLengthError(RequestError):
    """The prompt leaves no room for an answer in the model's context (the OpenAI API's
    ``context_length_exceeded``)."""
