"""The request envelope, in one place: one TorchServe request row (and its Content-Type) to the body bytes.

TorchServe hands a handler each request as a row: ``{"body": bytes}`` for a raw body,
``{"data": ...}`` for a multipart field named ``data``, or the parsed JSON for
``application/json``, where the image is base64 under ``data`` (or ``image``, ``b64``, ``body``,
``file``, or a one-item ``instances`` list).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .batch import Body
from .errors import InvalidInput, UnsupportedMediaType

# Content types accepted for a request body; anything else is a 415.
ACCEPTED_TYPES = ("image/", "application/json", "application/octet-stream", "multipart/form-data")
FORM = "application/x-www-form-urlencoded"
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
_KEYS = ("data", "body", "image", "file", "b64")


def check_content_type(content_type: str) -> None:
    """Refuse a body TorchServe could not hand over whole, or we cannot read, with what to send instead."""
    ctype = content_type.strip().lower()
    if ctype.startswith(FORM):
        raise UnsupportedMediaType(
            "the body was sent as a form (curl --data-binary without -H does that), which TorchServe "
            "splits into fields: send the image with its type, e.g. -H 'Content-Type: image/jpeg' or image/png"
        )
    if ctype and not ctype.startswith(ACCEPTED_TYPES):
        raise UnsupportedMediaType(
            f"content type {ctype!r} is not supported: send image/jpeg, image/png, "
            "multipart/form-data or application/json"
        )


def body_bytes(row: Any, content_type: str = "") -> Body:
    """The image bytes of one request row; raises a RequestError (400/415) that says what to send."""
    check_content_type(content_type)
    if isinstance(row, dict) and "body" in row and row["body"] is not None:
        row = row["body"]
    return _bytes(row)


def _bytes(item: Any) -> Body:
    if isinstance(item, dict):
        for key in _KEYS:
            if key in item and item[key] is not None:
                return _bytes(item[key])
        if isinstance(item.get("instances"), list) and len(item["instances"]) == 1:
            return _bytes(item["instances"][0])
        raise InvalidInput(
            "no image found: send the image as the raw body, a multipart field named "
            '\'data\', or JSON {"data": "<base64>"}'
        )
    if isinstance(item, (bytes, bytearray, memoryview)):
        if isinstance(item, memoryview):  # kept without a copy (a worker's body arena); one byte per item
            item = item.cast("B") if item.c_contiguous else item.tobytes()
        if not item:
            raise InvalidInput("empty body: send a JPEG, PNG or WebP image")
        head = bytes(item[:64])
        if not head.startswith(_MAGIC) and head.lstrip()[:1] in (b"{", b"["):
            raise InvalidInput("malformed JSON body")
        return item
    if isinstance(item, str):
        return _b64decode(item)
    raise InvalidInput(f"unsupported request item of type {type(item).__name__}")


def _b64decode(text: str) -> bytes:
    text = text.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if not text:
        raise InvalidInput("empty base64 image")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("the JSON image field is not valid base64") from None
