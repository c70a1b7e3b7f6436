"""Typed errors, each mapped to the HTTP status a client should see."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line of text, cut to ``limit`` characters (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class ServeKitError(Exception):
    """Base error; ``status`` is the HTTP status code it maps to."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(ServeKitError):
    """The request body is not something the model can take."""

    status = 400


class UnsupportedMediaType(ServeKitError):
    """The body's format (or declared content type) is not supported."""

    status = 415


class PayloadTooLarge(ServeKitError):
    """The body or the decoded image is larger than the configured limit."""

    status = 413


class OutOfMemory(ServeKitError):
    """The device or host ran out of memory for this batch."""

    status = 507


class ModelError(ServeKitError):
    """The model failed while running."""

    status = 500


class ConfigError(ServeKitError):
    """A model or server configuration is missing or invalid."""

    status = 500


class ExportMismatch(ServeKitError):
    """An exported artifact disagrees with the eager model."""

    status = 500
