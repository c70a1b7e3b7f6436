"""Package each configuration: export its artifact once, archive it with the point's model-config."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .. import preload
from ..archive import ArchiveRequest, archive, build_artifact
from ..config import ClassifierOptions, ModelConfig
from ..hooks import MODELS_DIR, BuildHook
from . import stock
from .configs import CONFIGS
from .plan import Artifacts, Plan, Point

Log = Callable[[str], None]
NOOP_HANDLER = str(Path(__file__).with_name("noop_handler.py"))


def prepare_artifacts(plan: Plan, workdir: Path, log: Log) -> Artifacts:
    """Export the model once (reusing an up-to-date build), then derive the copies the plan needs."""
    from .micro import derived_artifact

    model_dir = MODELS_DIR / plan.model
    cfg = ModelConfig.load(model_dir / "model-config.yaml")
    req = ArchiveRequest(plan.model, model_dir, workdir / "store-base", weights=plan.weights)
    hook = BuildHook(model_dir)
    traced = build_artifact(req, cfg, hook, log=log)
    labels_file = traced.parent / "labels.json"

    def derive(name: str, **kw: bool) -> Path:
        folder = workdir / "artifacts" / name
        folder.mkdir(parents=True, exist_ok=True)
        if labels_file.is_file():
            shutil.copy2(labels_file, folder / "labels.json")
        return derived_artifact(traced, folder / "model.pt", **kw)

    cl = plan.channels_last_weights
    served = derive("channels-last", channels_last=True) if cl else traced
    frozen = derive("frozen", channels_last=cl, freeze=True) if plan.freeze else None  # True or "auto"
    plain_frozen = derive("plain-frozen", freeze=True) if plan.micro else None
    labels = json.loads(labels_file.read_text()) if labels_file.is_file() else []
    alternates = {}
    for name in plan.configs:
        config = CONFIGS[name]
        if config.export:
            log(f"{plan.model}: the artifact of {name} ({config.help}); checked against eager")
            export = replace(req, device=plan.device, **config.export)
            alternates[name] = build_artifact(export, cfg, hook, log=log)
    return Artifacts(traced, served, frozen, plain_frozen, [str(x) for x in labels], cfg.raw, alternates)


def ours_config(base: dict[str, Any], point: Point, overrides: dict[str, Any]) -> dict[str, Any]:
    """The model-config for one point: workers, batch and delay set, warm-up at 1 and the batch size."""
    raw = copy.deepcopy(base)
    workers = point.total_workers
    raw.update(minWorkers=workers, maxWorkers=workers, batchSize=point.batch, maxBatchDelay=point.delay)
    handler = raw.setdefault("handler", {}) or {}
    handler["warmup_batch_sizes"] = sorted({1, point.batch})
    handler.update(overrides)
    raw["handler"] = handler
    ModelConfig.from_dict(raw)  # refuse a bad override before anything is packaged
    return raw


def archive_ours(plan: Plan, art: Artifacts, config: str, point: Point, workdir: Path, label: str) -> tuple[Path, dict]:
    """Package our handler with this point's model-config into a store of its own."""
    overrides = {**plan.handler_overrides, **CONFIGS[config].handler}
    if CONFIGS[config].amp == "off":
        overrides["amp"] = "off"  # int8 kernels take fp32 input; the loader turns autocast off anyway
    elif CONFIGS[config].amp == "baked":
        overrides.pop("amp", None)  # baked into the package at export (model-config's amp on a GPU)
    raw = ours_config(art.base_config, point, overrides)
    model_dir = workdir / "configs" / label
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model-config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    store = workdir / "stores" / label
    mar = archive(
        ArchiveRequest(plan.model, model_dir, store, artifact=art.for_ours(config, bool(plan.freeze)), force=True),
        log=lambda *_: None,
    )
    return mar, raw


def archive_stock(
    plan: Plan, art: Artifacts, config: str, point: Point, workdir: Path, label: str
) -> tuple[Path, dict]:
    """Package the stock (or the no-op) handler with this point's batching settings."""
    raw = {
        "minWorkers": point.total_workers,
        "maxWorkers": point.total_workers,
        "batchSize": point.batch,
        "maxBatchDelay": point.delay,
        "responseTimeout": int(art.base_config.get("responseTimeout", 120)),
    }
    handler = NOOP_HANDLER if CONFIGS[config].noop else stock.STOCK_HANDLER
    mar = stock.archive_stock(plan.model, art.served, art.labels, workdir / "stores" / label, raw, handler=handler)
    return mar, raw


@dataclass
class Packaged:
    """One configuration ready to start: TorchServe's archive, or what the peer loads itself."""

    threads: int  # torch threads per worker
    env: dict[str, str]  # for the server's processes
    topk: int  # entries in a good answer
    facts: dict[str, Any]  # for the run's record
    mar: Path | None = None
    artifact: Path | None = None  # the peer: the model file (labels.json beside it) ...
    model_config: dict[str, Any] = field(default_factory=dict)  # ... and its model-config


def package(
    plan: Plan, art: Artifacts, config: str, point: Point, workdir: Path, slug: str, default_threads: int
) -> Packaged:
    """Archive one configuration (or, for the peer, write nothing: it loads our artifact itself)."""
    spec = CONFIGS[config]
    if spec.our_points:  # our pipeline: our handler in TorchServe, or inside the peer
        if spec.ours:
            mar, raw = archive_ours(plan, art, config, point, workdir, slug)
            handler = "servekit servekit/handlers/image_classifier.py"
        else:
            mar, raw = None, ours_config(art.base_config, point, plan.handler_overrides)
            handler = "servekit ImageClassifier in LitServe (servekit/bench/peer_app.py)"
        opts = ModelConfig.from_dict(raw).options(ClassifierOptions)
        facts = {
            "handler": handler,
            "amp": spec.precision(opts.amp, plan.device),
            "frozen": True if config in art.alternates else plan.freeze,
            "handler_options": raw["handler"],
            "model_config": {k: v for k, v in raw.items() if k != "handler"},
        }
        facts["preloaded"] = spec.ours and preload.enabled()
        artifact = art.for_ours(config, bool(plan.freeze))
        return Packaged(opts.threads(point.total_workers), {}, opts.topk, facts, mar, artifact, raw)
    mar, raw = archive_stock(plan, art, config, point, workdir, slug)
    name = "servekit/bench/noop_handler.py (no decode, no inference)" if spec.noop else None
    facts = {
        "handler": name or "TorchServe image_classifier (stock)",
        "amp": "off",
        "frozen": False,
        "model_config": {k: v for k, v in raw.items() if k != "handler"},
    }
    threads = point.tuned_threads() if spec.tuned_threads else default_threads
    # Stock is TorchServe as shipped: its workers start plainly, not from servekit's preloader.
    env = {"OMP_NUM_THREADS": str(threads), preload.ENV: "0"}
    return Packaged(threads, env, 5, {**facts, "preloaded": False}, mar)
