"""HTTP clients: ``Client`` for users (a URL, a key, parsed answers, retries), and the inference and
management API clients servekit's own tools use (they read, and re-read, TorchServe's key file)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .imageheader import JPEG, PNG, WEBP, sniff_format
from .tokens import TokenFile

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
_SNIFFED = {JPEG: "image/jpeg", PNG: "image/png", WEBP: "image/webp"}


def auth_failed(resp: requests.Response) -> bool:
    """Whether TorchServe refused the token (0.12 answers 400 InvalidKeyException, not 401)."""
    if resp.status_code == 401:
        return True
    return resp.status_code == 400 and "InvalidKeyException" in resp.text


class _Api:
    """A requests session that adds the bearer token and carries requests through key rotation."""

    kind = "inference"
    attempts = 6
    retry: Retry | None = None  # urllib3 retries of the whole session, on top of the key re-reads

    def __init__(
        self,
        base_url: str,
        token_file: str | os.PathLike | TokenFile | None = None,
        timeout: float = 60.0,
        api_key: str | None = None,
    ):
        self.base = base_url.rstrip("/")
        if token_file is None or isinstance(token_file, TokenFile):
            self.tokens = token_file
        else:
            self.tokens = TokenFile(token_file)
        self.timeout = timeout
        self.session = requests.Session()
        if self.retry is not None:
            self.session.mount("http://", HTTPAdapter(max_retries=self.retry))
        if api_key:  # a fixed key (the pod's proxy): sent on every request, never re-read
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        """Send with the current token; while it is refused, re-read key_file.json and retry.

        Keys rotate (token API) and expire; a refused key is retried a few times with a fresh
        read, since TorchServe writes the new key file just after it starts refusing the old key.
        """
        kw.setdefault("timeout", self.timeout)
        headers = dict(kw.pop("headers", None) or {})
        for attempt in range(self.attempts):
            if self.tokens is not None:
                headers.update(self.tokens.header(self.kind, force=attempt > 0))
            resp = self.session.request(method, self.base + path, headers=headers, **kw)
            if not auth_failed(resp) or self.tokens is None:
                return resp
            time.sleep(0.05 * (attempt + 1))
        return resp


class InferenceClient(_Api):
    """Predictions, health and readiness on the inference port."""

    kind = "inference"

    def predict(
        self, model: str, body: bytes, content_type: str = "application/octet-stream", version: str | None = None
    ) -> requests.Response:
        """POST one image; the response JSON is the handler's answer."""
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return self.request("POST", path, data=body, headers={"Content-Type": content_type})

    def predict_file(self, model: str, path: str | os.PathLike, version: str | None = None) -> requests.Response:
        """POST an image file with the content type its suffix implies."""
        p = Path(path)
        ctype = CONTENT_TYPES.get(p.suffix.lower(), "application/octet-stream")
        return self.predict(model, p.read_bytes(), ctype, version)

    def ping(self) -> requests.Response:
        """GET /ping."""
        return self.request("GET", "/ping")


class ManagementClient(_Api):
    """Model registry operations on the (loopback) management port."""

    kind = "management"
    # TorchServe 0.12 now and then answers a scale (PUT) with 500 while other management calls race
    # it. Scaling and setting the default are idempotent, so they are sent again: the repeat finds
    # the state already reached, or reaches it. POST and DELETE are never repeated.
    retry = Retry(
        total=2,
        connect=0,
        read=0,
        other=0,
        status=2,
        status_forcelist=(500,),
        allowed_methods=("PUT",),
        backoff_factor=0.25,
        raise_on_status=False,
    )

    def models(self) -> list[dict]:
        """Registered models: ``[{"modelName", "modelUrl"}]``."""
        resp = self.request("GET", "/models", params={"limit": 1000})
        resp.raise_for_status()
        return resp.json().get("models", [])

    def describe(self, model: str, version: str = "all") -> list[dict]:
        """Registered versions of ``model`` with their workers ("" = the default; empty if none)."""
        resp = self.request("GET", f"/models/{model}" + (f"/{version}" if version else ""))
        if resp.status_code == 404:
            return []
        resp.raise_for_status()
        return resp.json()

    def register(
        self, url: str, initial_workers: int | None = None, synchronous: bool = True, timeout: float = 600.0
    ) -> requests.Response:
        """Register an archive (a file name in the model store)."""
        params: dict[str, Any] = {"url": url, "synchronous": str(synchronous).lower()}
        if initial_workers is not None:
            params["initial_workers"] = initial_workers
        return self.request("POST", "/models", params=params, timeout=timeout)

    def set_default(self, model: str, version: str) -> requests.Response:
        """Make ``version`` the one that answers /predictions/<model>."""
        return self.request("PUT", f"/models/{model}/{version}/set-default")

    def unregister(self, model: str, version: str | None = None, timeout: float = 120.0) -> requests.Response:
        """Unregister a version (or the default one)."""
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self.request("DELETE", path, timeout=timeout)

    def scale(
        self,
        model: str,
        min_worker: int,
        max_worker: int | None = None,
        version: str | None = None,
        synchronous: bool = True,
    ) -> requests.Response:
        """Set a version's worker count."""
        path = f"/models/{model}" + (f"/{version}" if version else "")
        params = {
            "min_worker": min_worker,
            "max_worker": max_worker or min_worker,
            "synchronous": str(synchronous).lower(),
        }
        return self.request("PUT", path, params=params, timeout=600)


@dataclass
class ModelState:
    """One registered version as the management API reports it."""

    name: str
    version: str
    default: bool
    ready_workers: int
    workers: int
    url: str
    pending: int = 0  # requests waiting in its queue (TorchServe's jobQueueStatus)


def model_states(mgmt: ManagementClient) -> list[ModelState]:
    """Every registered version of every model, with worker readiness."""
    states = []
    for m in mgmt.models():
        # "all" lists every version but not which is the default; the bare name answers that.
        default = mgmt.describe(m["modelName"], "")
        default_version = str(default[0]["modelVersion"]) if default else None
        for d in mgmt.describe(m["modelName"]):
            workers = d.get("workers", [])
            states.append(
                ModelState(
                    name=d["modelName"],
                    version=str(d["modelVersion"]),
                    default=str(d["modelVersion"]) == default_version,
                    ready_workers=sum(w.get("status") == "READY" for w in workers),
                    workers=len(workers),
                    url=d.get("modelUrl", ""),
                    pending=int((d.get("jobQueueStatus") or {}).get("pendingRequests") or 0),
                )
            )
    return states


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (requests.RequestException, FileNotFoundError, ValueError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" ({last_exc})" if last_exc else ""))


# -- the client users import ------------------------------------------------------------------------
DEFAULT_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class Label:
    """One class of a classification answer."""

    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Prediction:
    """An answer: the model and version that gave it, the parsed labels (classifiers), the JSON as sent."""

    model: str
    version: str
    labels: list[Label]
    answer: dict

    @property
    def top(self) -> Label | None:
        """The most likely class (None for an answer that is not a classification)."""
        return self.labels[0] if self.labels else None


class PredictionError(Exception):
    """The server answered with an error: its HTTP status, the error's type and message."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(f"{status} {type_}: {message}")
        self.status, self.type, self.message = status, type_, message


def retrying_session(retries: int = 5, backoff: float = 0.25) -> requests.Session:
    """A session that retries connection errors and 503s with exponential backoff (urllib3's Retry).

    503 means TorchServe had no worker for the request (loading, restarting, scaled down): it was
    not run, so even a POST may be sent again; an answer cut off midway is not retried.
    """
    retry = Retry(
        total=retries,
        connect=retries,
        read=0,
        status=retries,
        other=0,
        backoff_factor=backoff,
        status_forcelist=(503,),
        allowed_methods=None,
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class Client:
    """Predictions from a servekit server, local or behind the pod's proxy.

    ``url``: argument, else ``$SERVEKIT_URL``, else the local default. The key: ``key`` or
    ``$SERVEKIT_KEY`` (a fixed key, e.g. one of the Kubernetes Secret's), else ``key_file`` or
    ``$SERVEKIT_KEY_FILE`` (TorchServe's ``key_file.json``, read again when a key is refused), else
    none. Connection errors and 503s are retried with backoff.
    """

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        key_file: str | os.PathLike | None = None,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.25,
    ):
        self.url = (url or os.environ.get("SERVEKIT_URL") or DEFAULT_URL).rstrip("/")
        key = key or os.environ.get("SERVEKIT_KEY")
        key_file = key_file or os.environ.get("SERVEKIT_KEY_FILE")
        tokens = TokenFile(key_file) if key_file and not key else None
        self.api = InferenceClient(self.url, tokens, timeout=timeout, api_key=key)
        self.api.session = retrying_session(retries, backoff)
        if key:
            self.api.session.headers["Authorization"] = f"Bearer {key}"
        self.retries = 0  # retries the last request needed

    def predict(
        self, model: str, image: bytes | str | os.PathLike, version: str | None = None, content_type: str | None = None
    ) -> Prediction:
        """Send one image (bytes, or a file path) and return the parsed answer; raises PredictionError."""
        if isinstance(image, (bytes, bytearray)):
            body, ctype = bytes(image), content_type or sniffed_content_type(bytes(image))
        else:
            path = Path(image)
            body, ctype = path.read_bytes(), content_type or CONTENT_TYPES.get(path.suffix.lower(), "")
        resp = self.api.predict(model, body, ctype or "application/octet-stream", version)
        self.retries = len(resp.raw.retries.history) if resp.raw is not None and resp.raw.retries else 0
        try:
            answer = resp.json()
        except ValueError:
            answer = {}
        if resp.status_code != 200:
            raise PredictionError(
                resp.status_code,
                str(answer.get("type", resp.reason)),
                str(answer.get("message", resp.text.strip()[:300])),
            )
        labels = [
            Label(str(p["label"]), int(p["index"]), float(p["probability"]))
            for p in answer.get("predictions", [])
            if isinstance(p, dict) and "label" in p
        ]
        return Prediction(
            resp.headers.get("X-Model-Name", model), resp.headers.get("X-Model-Version", ""), labels, answer
        )


def sniffed_content_type(body: bytes) -> str:
    """The content type of image bytes (JPEG, PNG or WebP), from their first bytes."""
    fmt = sniff_format(body)
    return _SNIFFED[fmt] if fmt else "application/octet-stream"
