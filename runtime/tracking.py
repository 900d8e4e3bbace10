"""Experiment-tracking hooks the trainer calls: a no-op by default, MLflow on request.

The trainer calls, in order: `start(params)` once before the first model call,
`log_metrics(step, record)` once per metrics.jsonl line (iteration 0 is the
initial evaluation), `log_artifacts(run_dir)` once the run directory is
complete, and `end(status)` always (in a `finally`). `Tracker` itself does
nothing, so the trainer never branches on whether tracking is on.

MLflow is an optional extra (`pip install "dlngraph[mlflow]"`) and is imported
only when an `MLflowTracker` starts. It talks through `MlflowClient`, not the
fluent `mlflow.start_run` API, so no global "active run" state leaks into the
process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlngraph.errors import RuntimeFailure
from dlngraph.spec import Spec

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 500  # MLflow caps param values; long ones are cut, the full spec is an artifact


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested record as {"a.b": float}; bools count as 0/1, the rest is dropped.

    >>> flatten({"dev_acc": 0.5, "train_acc": None, "loss": {"answer": 1.25}, "accepted": {"answer": True}})
    {'accepted.answer': 1.0, 'dev_acc': 0.5, 'loss.answer': 1.25}
    """
    out: dict[str, float] = {}
    for key in sorted(record):
        value, name = record[key], f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float)):
            out[name] = float(value)
    return out


def spec_params(spec: Spec) -> dict[str, str]:
    """What a run is configured with, as MLflow params: training hyperparameters, nodes, backends."""
    params = {f"train.{k}": v for k, v in spec.train.model_dump(mode="json").items()}
    params["spec"] = spec.name
    params["nodes"] = ",".join(sorted(spec.nodes))
    for name, backend in sorted(spec.backends.items()):
        params[f"backend.{name}"] = backend.kind + (f":{backend.model}" if getattr(backend, "model", None) else "")
    return {k: str(v)[:MAX_PARAM_CHARS] for k, v in sorted(params.items())}


class Tracker:
    """No-op tracker: the default when no tracking is configured."""

    def start(self, params: Mapping[str, Any]) -> None:
        """Open a run and record its parameters."""

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one iteration's metrics (a metrics.jsonl record; nested dicts are flattened)."""

    def log_artifacts(self, run_dir: Path) -> None:
        """Attach every file of the run directory."""

    def end(self, status: str = "FINISHED") -> None:
        """Close the run: FINISHED, FAILED or KILLED."""


class MLflowTracker(Tracker):
    def __init__(self, experiment: str, tracking_uri: str | None = None, run_name: str | None = None):
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.run_name = run_name
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, params: Mapping[str, Any]) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise RuntimeFailure(
                "MLflow tracking was requested but mlflow is not installed",
                hint='pip install "dlngraph[mlflow]"',
            ) from exc
        try:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        except MlflowException as exc:
            raise RuntimeFailure(
                f"could not open an MLflow run at {self.tracking_uri or 'the default tracking URI'}: {exc.message}",
                hint="set tracking.mlflow.tracking_uri, e.g. sqlite:///mlflow.db "
                "(a file:// store needs MLFLOW_ALLOW_FILE_STORE=true with MLflow >= 3.7)",
            ) from exc
        values = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
        self.client.log_batch(self.run_id, params=values)
        log.info("mlflow run %s in experiment %r", self.run_id, self.experiment)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in flatten(metrics).items() if k != "iteration"]
        self.client.log_batch(self.run_id, metrics=values)

    def log_artifacts(self, run_dir: Path) -> None:
        self.client.log_artifacts(self.run_id, str(run_dir))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
            self.run_id = None


def make_tracker(spec: Spec, *, mlflow: bool = False, run_name: str | None = None) -> Tracker:
    """The tracker a fit reports to: MLflow if the spec's `tracking.mlflow` or `--mlflow` asks for it."""
    config = spec.tracking.mlflow
    if config is None and not mlflow:
        return Tracker()
    return MLflowTracker(
        experiment=(config and config.experiment) or spec.name,
        tracking_uri=config and config.tracking_uri,
        run_name=run_name,
    )
