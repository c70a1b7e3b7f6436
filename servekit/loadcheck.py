"""Steady prediction traffic that checks every answer: for soak runs, reload measurements and tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import requests

from .client import InferenceClient


@dataclass
class Outcome:
    """One request: when it ran (on the load's clock) and what came back."""

    start: float
    end: float
    status: int | None  # None: no HTTP answer (connection error or client timeout)
    ok: bool  # 200 with predictions, and the expected top label where one is given
    version: str | None = None  # X-Model-Version of the answer
    error: str = ""


def check_answer(resp: requests.Response, label: str | None) -> str:
    """Why an answer is wrong ("" when it is right): status, body shape, top label."""
    if resp.status_code != 200:
        return f"{resp.status_code}: {resp.text[:300]}"
    try:
        top = resp.json()["predictions"][0]["label"]
    except (ValueError, KeyError, IndexError, TypeError):
        return f"200 without predictions: {resp.text[:300]}"
    return "" if label is None or top == label else f"predicted {top}, expected {label}"


class CheckedLoad:
    """``threads`` clients posting ``samples`` (body, expected label or None) to ``model`` until stopped.

    Every request becomes an :class:`Outcome`; nothing raises in the client threads. ``pause`` seconds
    between a client's requests bound the load; ``clock`` sets the time base of the outcomes.
    """

    def __init__(
        self,
        make_client: Callable[[], InferenceClient],
        model: str,
        samples: Sequence[tuple[bytes, str | None]],
        threads: int = 4,
        timeout: float = 60.0,
        content_type: str = "image/png",
        pause: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not samples:
            raise ValueError("CheckedLoad needs at least one sample")
        self.make_client, self.model, self.samples = make_client, model, list(samples)
        self.threads, self.timeout, self.content_type = threads, timeout, content_type
        self.pause, self.clock = pause, clock
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> CheckedLoad:
        """Start the client threads."""
        self._stop.clear()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for t in self._workers:
            t.start()
        return self

    def stop(self) -> None:
        """Stop and wait for the clients (each finishes its request in flight)."""
        self._stop.set()
        for t in self._workers:
            t.join(self.timeout + 10)

    def __enter__(self) -> CheckedLoad:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, seed: int) -> None:
        client = self.make_client()
        client.timeout = self.timeout
        i = seed
        while not self._stop.is_set():
            body, label = self.samples[i % len(self.samples)]
            i += 1
            t0 = self.clock()
            try:
                resp = client.predict(self.model, body, self.content_type)
                error = check_answer(resp, label)
                out = Outcome(t0, self.clock(), resp.status_code, not error, resp.headers.get("X-Model-Version"), error)
            except Exception as exc:  # a client thread must not die: everything becomes an outcome
                out = Outcome(t0, self.clock(), None, False, error=f"{type(exc).__name__}: {exc}"[:300])
            with self._lock:
                self.outcomes.append(out)
            if self.pause:
                time.sleep(self.pause)

    def snapshot(self) -> list[Outcome]:
        """The outcomes so far, in completion order."""
        with self._lock:
            return list(self.outcomes)

    def failures(self) -> list[Outcome]:
        """The outcomes that were not right answers."""
        return [o for o in self.snapshot() if not o.ok]

    def ok_streak(self) -> int:
        """How many of the latest requests in a row succeeded."""
        streak = 0
        for o in sorted(self.snapshot(), key=lambda o: o.end, reverse=True):
            if not o.ok:
                break
            streak += 1
        return streak

    def first(self, version: str, after: float = float("-inf")) -> float | None:
        """When the first right answer from ``version`` arrived (its end time), if one has."""
        return min((o.end for o in self.snapshot() if o.ok and o.version == version and o.end >= after), default=None)

    def versions(self, start: float, end: float = float("inf")) -> Counter:
        """Right answers per version among those that arrived between ``start`` and ``end``."""
        return Counter(o.version for o in self.snapshot() if o.ok and start <= o.end <= end)
