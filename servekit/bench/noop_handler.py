"""A TorchServe handler that answers each request without decoding or inference: the server's floor.

Archived by the bench's ``noop`` configuration; its CPU per request is TorchServe's own cost (frontend,
socket to the worker, the worker's request loop), which no handler can go below.
"""

from __future__ import annotations

import json
from typing import Any

# Built once: the same five-entry answer the stock handler gives, so the load generator checks it alike.
ANSWER = json.dumps({str(i): 0.2 for i in range(5)})


def handle(data: list[Any] | None, context: Any) -> list[str] | None:
    """One fixed answer per request of the batch (``None``: TorchServe's load-time call)."""
    if data is None:
        return None
    return [ANSWER] * len(data)
