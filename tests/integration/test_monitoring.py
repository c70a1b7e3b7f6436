"""Every dashboard query, alert and autoscaling query, run on a real Prometheus that scrapes a real server.

TorchServe (serving digits v1.0 and v2.0 registered without workers), the watcher and the proxy
(nginx, `servekit proxy`) run on loopback as in a pod; Debian's Prometheus scrapes the proxy's
three metrics paths every second, with the namespace and pod labels the Prometheus Operator
would add, and evaluates the alert rules. Traffic through the proxy brings 200s, 401s, 415s and
503s; a corrupt archive brings a failed reload. Then every query must run, every dashboard panel
must show data, and the alerts that should fire must be firing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import start_server
from servekit import server
from servekit.client import wait_until
from servekit.reload import watch_command
from support.rel_support import digit_samples

pytestmark = [pytest.mark.server, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "components" / "monitoring"
KEY = "monitoring-test-key-0123456789"
LABELS = {"namespace": "test", "pod": "pod-a"}
SHOULD_FIRE = {"ServekitErrorRatioHigh", "ServekitReloadFailed"}


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads((MONITORING / "grafana-dashboard.json").read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def grafana(expr: str) -> str:
    """A dashboard expression as Grafana would send it: its variables filled in."""
    return expr.replace("$namespace", ".*").replace("$__rate_interval", "30s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, archives):
    tmp = tmp_path_factory.mktemp("monitoring")
    srv = start_server(tmp / "srv", archives, {"digits": "digits-v1.0.mar"}, disable_token_authorization="true")
    cfg, procs = srv.cfg, []
    try:
        shutil.copy2(archives / "digits-v2.0.mar", cfg.model_store)
        # v2.0 registered without workers: its requests get 503 (the error-ratio alert's input).
        mgmt = cfg.management()
        assert mgmt.register("digits-v2.0.mar", initial_workers=1).status_code == 200
        assert mgmt.scale("digits", 0, version="2.0").status_code == 200
        versions = tmp / "versions.yaml"
        versions.write_text('digits: "1.0"\n')
        watcher_port, *free = server.free_ports(5)
        ports = dict(zip(("http", "metrics", "stats", "prom"), free))
        procs.append(
            subprocess.Popen(
                watch_command(cfg, "--interval", "0.5", "--versions", str(versions), "--http-port", str(watcher_port)),
                stdout=open(tmp / "watcher.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        keys = tmp / "keys"
        keys.mkdir()
        (keys / "key-1").write_text(KEY)
        inference = cfg.address("inference_address").removeprefix("http://")
        ts_metrics = cfg.address("metrics_address").removeprefix("http://")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "servekit.proxy",
                    "--listen",
                    str(ports["http"]),
                    "--metrics-listen",
                    str(ports["metrics"]),
                    "--inference",
                    inference,
                    "--ts-metrics",
                    ts_metrics,
                    "--watcher",
                    f"127.0.0.1:{watcher_port}",
                    "--keys-dir",
                    str(keys),
                    "--run-dir",
                    str(tmp / "proxy"),
                    "--stats-port",
                    str(ports["stats"]),
                    "--metrics-port",
                    str(server.free_port()),
                    "--no-access-log",
                ],
                stdout=open(tmp / "proxy.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        rules = tmp / "rules.yaml"
        rules.write_text(
            yaml.safe_dump(
                [d for d in yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text()) if d][0]["spec"]
            )
        )
        target = [{"targets": [f"127.0.0.1:{ports['metrics']}"], "labels": LABELS}]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": f"servekit{path.replace('/', '-')}", "metrics_path": path, "static_configs": target}
                for path in ("/metrics", "/metrics/servekit", "/metrics/proxy")
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        procs.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{ports['prom']}",
                ],
                stdout=open(tmp / "prometheus.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        proxy, prom = f"http://127.0.0.1:{ports['http']}", f"http://127.0.0.1:{ports['prom']}"
        wait_until(
            lambda: requests.get(proxy + "/healthz/ready", timeout=5).status_code == 200,
            60,
            what="the proxy's ready path",
        )
        wait_until(lambda: requests.get(prom + "/-/ready", timeout=5).status_code == 200, 60, what="Prometheus")
        drive_traffic(proxy)
        (cfg.model_store / "digits-v9.0.mar").write_bytes(b"not a zip: a failed reload")
        yield prom, tmp
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
        server.stop(cfg.run_dir)


def drive_traffic(proxy: str, seconds: float = 12.0) -> None:
    """200s, and some 401s, 415s and 503s, through the proxy for a while."""
    samples = digit_samples(8)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "image/png"}
    deadline, i = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        body, _ = samples[i % len(samples)]
        assert requests.post(proxy + "/predictions/digits", data=body, headers=auth, timeout=30).status_code == 200
        if i % 5 == 0:
            requests.post(proxy + "/predictions/digits", data=body, headers={"Content-Type": "image/png"}, timeout=30)
            requests.post(proxy + "/predictions/digits", data=b"text", headers=auth, timeout=30)
            requests.post(proxy + "/predictions/digits/2.0", data=body, headers=auth, timeout=30)
        i += 1


def query(prom: str, expr: str) -> list[dict]:
    resp = requests.get(prom + "/api/v1/query", params={"query": expr}, timeout=30).json()
    assert resp["status"] == "success", f"{expr}: {resp}"
    return resp["data"]["result"]


def test_every_dashboard_query_shows_data(stack):
    prom, _ = stack
    queries = dashboard_queries()

    def all_have_data() -> bool:
        return all(query(prom, grafana(expr)) for _, expr in queries)

    try:
        wait_until(all_have_data, 90, interval=2, what="every dashboard query to return data")
    except TimeoutError:
        empty = [title for title, expr in queries if not query(prom, grafana(expr))]
        pytest.fail(f"panels without data: {empty}")
    codes = {r["metric"]["code"] for r in query(prom, 'servekit_requests_total{model="digits"}')}
    assert {"200", "415", "503"} <= codes, codes
    assert query(prom, 'servekit_requests_total{model="(refused)",code="401"}'), "401s are pooled, not per model"


def test_alerts_evaluate_and_the_right_ones_fire(stack):
    prom, _ = stack
    rules = [
        r
        for g in yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text())
        if g
        for group in g["spec"]["groups"]
        for r in group["rules"]
    ]
    fire = [r["expr"] for r in rules if r["alert"] in SHOULD_FIRE]
    wait_until(lambda: all(query(prom, expr) for expr in fire), 60, what=f"{SHOULD_FIRE} to have data")
    for rule in rules:
        result = query(prom, rule["expr"])
        assert bool(result) == (rule["alert"] in SHOULD_FIRE), (rule["alert"], result)

    def firing() -> set[str]:
        alerts = requests.get(prom + "/api/v1/alerts", timeout=30).json()["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] in ("pending", "firing")}

    wait_until(lambda: SHOULD_FIRE <= firing(), 60, what=f"Prometheus to evaluate {SHOULD_FIRE}")
    loaded = requests.get(prom + "/api/v1/rules", timeout=30).json()["data"]["groups"][0]["rules"]
    assert {r["name"] for r in loaded} == {r["alert"] for r in rules} and all(r["health"] == "ok" for r in loaded)


def test_the_autoscaling_metric_has_a_value_per_pod(stack):
    prom, _ = stack
    rule = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    assert query(prom, rule["seriesQuery"])
    expr = rule["metricsQuery"].replace("<<.LabelMatchers>>", 'namespace="test",pod="pod-a"')
    (value,) = query(prom, expr.replace("<<.GroupBy>>", "pod"))
    assert value["metric"] == {"pod": "pod-a"} and 0 <= float(value["value"][1]) < 5


def test_plot_of_the_dashboard_queries(stack):
    """The panels' data over the run, drawn (docs/monitoring.md shows this picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prom, tmp = stack
    end = time.time()
    panels = json.loads((MONITORING / "grafana-dashboard.json").read_text())["panels"]
    shown = [p for p in panels if p["type"] == "timeseries"]
    fig, axes = plt.subplots((len(shown) + 1) // 2, 2, figsize=(13, 2.6 * ((len(shown) + 1) // 2)))
    for ax, panel in zip(axes.flat, shown):
        for target in panel["targets"]:
            params = {"query": grafana(target["expr"]), "start": end - 90, "end": end, "step": 2}
            data = requests.get(prom + "/api/v1/query_range", params=params, timeout=30).json()["data"]["result"]
            for series in data:
                label = target["legendFormat"]
                for key, value in series["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                xs = [float(t) - end for t, _ in series["values"]]
                ax.plot(xs, [float(v) for _, v in series["values"]], label=label)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel("seconds before the last scrape", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    fig.tight_layout()
    out = ROOT / "build" / "monitoring" / "dashboard-queries.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    assert out.stat().st_size > 10_000
