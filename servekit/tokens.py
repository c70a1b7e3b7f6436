"""Read TorchServe's ``key_file.json`` so clients and tools never ask the user for a token."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Keys:
    """The three keys TorchServe writes: inference, management, and the token API key."""

    inference: str
    management: str
    api: str


class TokenFile:
    """A ``key_file.json`` that is re-read whenever it changes (token rotation)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._keys: Keys | None = None

    def keys(self, force: bool = False) -> Keys:
        """Current keys; re-read when the file changed (or when forced).

        TorchServe rewrites the file in place when keys rotate, so a read can catch it half
        written: retry briefly, then keep the last good keys.
        """
        for attempt in range(5):
            try:
                st = self.path.stat()
            except FileNotFoundError:
                if self._keys is not None:
                    return self._keys
                raise FileNotFoundError(
                    f"{self.path} not found: is TorchServe running with token authorization "
                    "from this run directory?"
                ) from None
            stamp = (st.st_mtime_ns, st.st_size)
            if not force and self._keys is not None and stamp == self._stamp:
                return self._keys
            try:
                self._keys = parse_keys(self.path.read_text())
                self._stamp = stamp
                return self._keys
            except (ValueError, KeyError, TypeError):
                time.sleep(0.02 * (attempt + 1))
        if self._keys is None:
            raise ValueError(f"{self.path} does not hold TorchServe keys")
        return self._keys

    def header(self, kind: str = "inference", force: bool = False) -> dict[str, str]:
        """An ``Authorization`` header for ``kind`` (inference, management or api)."""
        return {"Authorization": f"Bearer {getattr(self.keys(force), kind)}"}


def parse_keys(text: str) -> Keys:
    """Parse the JSON TorchServe writes into :class:`Keys`."""
    data = json.loads(text)
    return Keys(
        inference=data["inference"]["key"],
        management=data["management"]["key"],
        api=data["API"]["key"],
    )
