"""The watcher's HTTP endpoint on the pod's loopback: Prometheus metrics, and readiness for the proxy's probe path."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from ..health import Health

log = logging.getLogger(__name__)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: no access log
        pass


def make_app(registry: CollectorRegistry, ready: Callable[[], Health]):
    """``/ready`` (200 or 503, JSON) and ``/metrics``."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/ready":
            health = ready()
            body = json.dumps({"status": "ready" if health.ok else "not ready", "detail": health.detail}).encode()
            start_response(
                "200 OK" if health.ok else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return metrics(environ, start_response)

    return app


def serve(port: int, registry: CollectorRegistry, ready: Callable[[], Health], host: str = "127.0.0.1"):
    """Serve the endpoint on a daemon thread; returns the server (``shutdown()`` stops it)."""
    httpd = make_server(
        host, port, make_app(registry, ready), server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    threading.Thread(target=httpd.serve_forever, name="watcher-http", daemon=True).start()
    log.info("watcher endpoint on http://%s:%d (/ready, /metrics)", host, port)
    return httpd
