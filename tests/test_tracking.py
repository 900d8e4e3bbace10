"""Experiment tracking: the no-op default, and MLflow against local stores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.tracking import MLflowTracker, Tracker, flatten, make_tracker, spec_params
from dlngraph.spec import Spec


def _spec(**extra) -> Spec:
    return Spec.model_validate(
        {
            "name": "toy",
            "inputs": ["input"],
            "nodes": {
                "answer": {"template": "{{ input }} {{ prompt }}", "output": {"type": "choice", "choices": ["a", "b"]}}
            },
            "outputs": {"answer": "target"},
            "train": {"iterations": 2, "batch_size": 4},
            **extra,
        }
    )


RECORDS = [
    {
        "iteration": i, "train_acc": 0.5 + 0.1 * i, "dev_acc": None if i == 1 else 0.4 + 0.1 * i,
        "loss": {"answer": 1.0 - 0.2 * i}, "accepted": {"answer": i == 2}, "calls": 3, "requests": 12,
        "prompt_tokens": 900, "completion_tokens": 0, "cost": 0.0, "seconds": 0.5,
    }
    for i in range(3)
]


def test_flatten_keeps_numeric_leaves_only() -> None:
    assert flatten(RECORDS[1]) == {
        "accepted.answer": 0.0, "calls": 3.0, "completion_tokens": 0.0, "cost": 0.0, "iteration": 1.0,
        "loss.answer": 0.8, "prompt_tokens": 900.0, "requests": 12.0, "seconds": 0.5, "train_acc": 0.6,
    }


def test_tracking_is_off_unless_asked() -> None:
    assert type(make_tracker(_spec())) is Tracker
    flagged = make_tracker(_spec(), mlflow=True, run_name="r")
    assert isinstance(flagged, MLflowTracker) and flagged.experiment == "toy" and flagged.tracking_uri is None
    configured = make_tracker(_spec(tracking={"mlflow": {"tracking_uri": "sqlite:///x.db", "experiment": "e"}}))
    assert isinstance(configured, MLflowTracker) and (configured.experiment, configured.tracking_uri) == ("e", "sqlite:///x.db")


def test_unknown_tracking_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="extra"):
        _spec(tracking={"mlflow": {"uri": "x"}})


def test_missing_mlflow_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(RuntimeFailure, match=r"dlngraph\[mlflow\]"):
        MLflowTracker("toy").start({})


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_mlflow_run_has_params_metrics_and_artifacts(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts a sqlite store's default artifact root under ./mlruns
    if store == "file":  # MLflow >= 3.7 keeps the file store behind this switch
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "runs" / "toy-20260101-000000"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (run_dir / "checkpoints" / "iter-0000.yaml").write_text("iteration: 0\n")

    spec = _spec(tracking={"mlflow": {"tracking_uri": uri}})
    tracker = make_tracker(spec, run_name=run_dir.name)
    tracker.start(spec_params(spec))
    for record in RECORDS:
        tracker.log_metrics(record["iteration"], record)
    tracker.log_artifacts(run_dir)
    run_id = tracker.run_id
    tracker.end()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert client.get_experiment(run.info.experiment_id).name == "toy"
    assert run.data.params["train.iterations"] == "2" and run.data.params["nodes"] == "answer"
    assert run.data.params["backend.local"] == "torch:embedded"
    dev = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "dev_acc"))
    assert dev == [(0, pytest.approx(0.4)), (2, pytest.approx(0.6))]  # the unevaluated iteration is absent
    assert [m.value for m in client.get_metric_history(run_id, "accepted.answer")] == [0.0, 0.0, 1.0]
    assert "iteration" not in run.data.metrics
    artifacts = sorted(a.path for a in client.list_artifacts(run_id))
    assert artifacts == ["checkpoints", "metrics.jsonl"]
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/iter-0000.yaml"]


@pytest.mark.model
def test_fit_logs_to_an_mlflow_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real 1-iteration fit of the DLN-1 scaffold, `dlngraph fit --mlflow`, the store named
    by MLFLOW_TRACKING_URI (the spec's `tracking.mlflow` path is covered above)."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    import yaml
    from mlflow.tracking import MlflowClient

    from dlngraph.cli import main

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec_path = tmp_path / "net" / "spec.yaml"
    main(["init", str(spec_path.parent)])
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    spec["train"].update(batch_size=2, prompt_proposals=2, dev_size=4)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    run_dir = tmp_path / "run"
    main(["fit", str(spec_path), "--iterations", "1", "--out", str(run_dir), "--cache", str(tmp_path / "cache"), "--mlflow"])

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(spec["name"]).experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.prompt_proposals"] == "2" and run.data.params["nodes"] == "answer"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "dev_acc")}
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    written = {r["iteration"]: r["dev_acc"] for r in map(json.loads, lines)}
    assert logged == pytest.approx(written) and sorted(logged) == [0, 1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.jsonl", "best.yaml", "plan.json", "spec.yaml", "checkpoints"} <= artifacts
