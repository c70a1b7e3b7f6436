"""Typed errors: request errors carry the HTTP status a client sees; the others map to a command's exit code."""

from __future__ import annotations

# Exit codes of every servekit command (argparse itself exits 2 on a usage error).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_CONFIG = 0, 1, 2, 3, 4


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line of text, cut to ``limit`` characters (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class ServeKitError(Exception):
    """Base error; ``exit_code`` is what a command that fails with it returns."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# -- request errors: one item of a request fails, with an HTTP status ---------------------------
class RequestError(ServeKitError):
    """A request (or one item of a batch) failed; ``status`` is the HTTP status it maps to."""

    status = 500


class InvalidInput(RequestError):
    """The request body is not something the model can take."""

    status = 400


class UnsupportedMediaType(RequestError):
    """The body's format (or declared content type) is not supported."""

    status = 415


class PayloadTooLarge(RequestError):
    """The body or the decoded image is larger than the configured limit."""

    status = 413


class OutOfMemory(RequestError):
    """The device or host ran out of memory for this batch."""

    status = 507


class ModelError(RequestError):
    """The model failed while running."""

    status = 500


# -- build and server errors: a command fails --------------------------------------------------
class ConfigError(ServeKitError):
    """A model or server configuration is missing or invalid."""

    exit_code = EXIT_CONFIG


class ExportMismatch(ConfigError):
    """An exported artifact disagrees with the eager model."""


class ServerUnreachable(ServeKitError):
    """TorchServe does not answer where the configuration says it listens."""

    exit_code = EXIT_UNREACHABLE


class ReloadError(ServeKitError):
    """A version could not be made the default; the message says why."""
