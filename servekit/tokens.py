"""TorchServe's ``key_file.json``: read it for every client, and renew its keys before they expire."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import requests

log = logging.getLogger(__name__)

KINDS = ("inference", "management")


@dataclass(frozen=True)
class Keys:
    """The three keys TorchServe writes (inference, management, the token API's) and when the first two expire."""

    inference: str
    management: str
    api: str
    # Epoch seconds; None when the file does not say (older TorchServe).
    expires: dict[str, float | None]


def _instant(text: str | None) -> float | None:
    """Epoch seconds of a Java ``Instant.toString()`` (``2026-11-28T10:00:00.123456789Z``)."""
    if not text:
        return None
    head, _, frac = text.rstrip("Z").partition(".")
    try:
        return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]}+00:00").timestamp()
    except ValueError:
        return None


def parse_keys(text: str) -> Keys:
    """Parse the JSON TorchServe writes into :class:`Keys`."""
    data = json.loads(text)
    return Keys(
        inference=data["inference"]["key"],
        management=data["management"]["key"],
        api=data["API"]["key"],
        expires={kind: _instant(data[kind].get("expiration time")) for kind in KINDS},
    )


class TokenFile:
    """A ``key_file.json`` that is re-read whenever it changes (renewal, rotation)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._keys: Keys | None = None
        self._lock = threading.Lock()

    def keys(self, force: bool = False) -> Keys:
        """Current keys; re-read when the file changed (or when forced).

        TorchServe rewrites the file in place when keys change, so a read can catch it half
        written: retry briefly, then keep the last good keys.
        """
        with self._lock:
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
                except (ValueError, KeyError, TypeError, AttributeError):
                    time.sleep(0.02 * (attempt + 1))
            if self._keys is None:
                raise ValueError(f"{self.path} does not hold TorchServe keys")
            return self._keys

    def header(self, kind: str = "inference", force: bool = False) -> dict[str, str]:
        """An ``Authorization`` header for ``kind`` (inference, management or api)."""
        return {"Authorization": f"Bearer {getattr(self.keys(force), kind)}"}


def renew_at(expires: float, lifetime_s: float) -> float:
    """When a key that expires at ``expires`` should be renewed: a third of its lifetime (at least 10 s) before."""
    return expires - max(lifetime_s / 3.0, 10.0)


class KeyRenewer:
    """Renews the inference and management keys through TorchServe's token API before they expire.

    TorchServe 0.12 keeps expiry (``token_expiration_min``) but nothing renews the keys: a server
    nobody tends refuses every client an hour after it starts. The renewal replaces a key, so
    ``key_file.json`` always holds valid keys and clients re-read it when their key is refused.
    ``on_renewal(kind, ok, expires)`` reports each attempt (metrics).
    """

    def __init__(
        self,
        management_url: str,
        tokens: TokenFile,
        lifetime_s: float,
        on_renewal: Callable[[str, bool, float | None], None] | None = None,
        retry_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ):
        self.url = management_url.rstrip("/") + "/token"
        self.tokens = tokens
        self.lifetime_s = lifetime_s
        self.on_renewal = on_renewal or (lambda *_: None)
        self.retry_s = retry_s
        self.clock = clock
        self.session = requests.Session()
        self.failing = False

    def due(self, keys: Keys) -> list[str]:
        """Both kinds once either is due (a key with no known expiry is due now): one refusal per client, not two."""
        now = self.clock()
        due = any(keys.expires.get(k) is None or now >= renew_at(keys.expires[k] or 0, self.lifetime_s) for k in KINDS)
        return list(KINDS) if due else []

    def next_check(self, keys: Keys) -> float:
        """Seconds until the next renewal is due (at most a minute, so a replaced key file is noticed)."""
        times = [renew_at(e, self.lifetime_s) for e in keys.expires.values() if e is not None]
        return min([60.0, *(t - self.clock() for t in times)])

    def renew(self, kind: str) -> float | None:
        """Ask the token API for a new ``kind`` key; its expiry once the key file holds it (raises otherwise)."""
        before = self.tokens.keys(force=True)
        resp = self.session.post(
            self.url, params={"type": kind}, timeout=30, headers={"Authorization": f"Bearer {before.api}"}
        )
        if resp.status_code != 200:
            raise RuntimeError(f"token API answered {resp.status_code}: {resp.text.strip()[:200]}")
        after = self.tokens.keys(force=True)
        expires = after.expires.get(kind)
        if getattr(after, kind) == getattr(before, kind) or (expires is not None and expires <= self.clock()):
            raise RuntimeError(f"the token API answered 200 but {self.tokens.path} holds no new {kind} key")
        return expires

    def step(self) -> float:
        """Renew what is due; the seconds to wait before the next step."""
        try:
            for kind in self.due(self.tokens.keys(force=True)):
                try:
                    expires = self.renew(kind)
                except Exception:
                    self.on_renewal(kind, False, None)
                    raise
                self.on_renewal(kind, True, expires)
                log.info("renewed the %s key (valid for %.0f s)", kind, (expires or self.clock()) - self.clock())
            if self.failing:
                log.info("key renewal works again")
            self.failing = False
            return max(0.5, self.next_check(self.tokens.keys()))
        except (requests.RequestException, FileNotFoundError, ValueError, RuntimeError) as exc:
            log.log(logging.DEBUG if self.failing else logging.WARNING, "key renewal failed, retrying: %s", exc)
            self.failing = True
            return self.retry_s

    def run(self, stop: threading.Event) -> None:
        """Renew until ``stop`` is set."""
        log.info("renewing TorchServe's keys before they expire (lifetime %.0f s)", self.lifetime_s)
        while not stop.is_set():
            stop.wait(self.step())
