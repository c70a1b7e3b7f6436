"""Request metrics at the pod's edge: nginx sends one line per prediction over syslog (UDP, loopback),
which becomes a Prometheus histogram of request seconds and a counter of answers by status, per model.

TorchServe 0.12 keeps only totals and last values of its request latency, from which no p99 can be
derived; the proxy sees every request from its first byte to the answer's last.
"""

from __future__ import annotations

import logging
import re
import socket
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger(__name__)

# Seconds: a batch's worth of milliseconds up to the proxy's upstream timeout.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 130.0)
# The nginx log_format of the stats line: the key's name (empty when refused), the URI, status, seconds.
LINE = re.compile(r"servekit: key=(?P<key>\S*) (?P<uri>\S+) (?P<status>\d{3}) (?P<seconds>[\d.]+)$")
URI = re.compile(r"^/predictions/(?P<model>[^/]+)(?:/[^/]+)?$")


def model_label(uri: str, key: str, status: int) -> str:
    """The model a request was for; clients cannot make up labels (refused or unknown models are pooled)."""
    if not key:
        return "(refused)"
    if status == 404:
        return "(unknown)"
    m = URI.match(uri)
    return m.group("model") if m else "(other)"


class RequestStats:
    """The proxy's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "servekit_requests",
            "Prediction requests through the proxy, by model and HTTP status",
            ["model", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "servekit_request_duration_seconds",
            "Seconds from a request's first byte to its answer's last, at the proxy",
            ["model"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.unreadable = 0

    def observe(self, line: str) -> bool:
        """Count one syslog line from nginx; False (and counted aside) when it is not ours."""
        m = LINE.search(line.strip())
        if not m:
            self.unreadable += 1
            return False
        status = int(m.group("status"))
        model = model_label(m.group("uri"), m.group("key"), status)
        self.requests.labels(model, str(status)).inc()
        self.duration.labels(model).observe(float(m.group("seconds")))
        return True

    def listen(self, port: int, stop: threading.Event, host: str = "127.0.0.1") -> threading.Thread:
        """Receive nginx's syslog lines on ``host:port`` (UDP) on a daemon thread until ``stop`` is set."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))
        sock.settimeout(0.5)

        def run() -> None:
            with sock:
                while not stop.is_set():
                    try:
                        data = sock.recv(65536)
                    except TimeoutError:
                        continue
                    self.observe(data.decode("utf-8", "replace"))

        thread = threading.Thread(target=run, name="proxy-stats", daemon=True)
        thread.start()
        return thread
