"""`dlngraph fit` and `dlngraph export` end to end on the real embedded model,
in-process (the session's model is reused), on tiny copies of the example specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dlngraph.api import compile_spec
from dlngraph.cli import main

pytestmark = pytest.mark.model

SPECS = Path(__file__).resolve().parents[1] / "specs"
# scale-out.yaml needs two inference servers; its backend is tested in test_litellm_backend.py.
LOCAL_SPECS = sorted(p.stem for p in SPECS.glob("*.yaml") if p.stem != "scale-out")
TINY = {"iterations": 2, "batch_size": 2, "prompt_proposals": 2, "posterior_samples": 2, "dev_size": 4, "proposal_max_tokens": 24}


def tiny_copy(name: str, root: Path, **train: int) -> Path:
    """The example spec with absolute data paths and settings small enough for a 2-core CPU."""
    spec = yaml.safe_load((SPECS / f"{name}.yaml").read_text())
    spec["data"] = {split: str((SPECS / path).resolve()) for split, path in spec["data"].items()}
    spec["train"] = {**spec.get("train", {}), **TINY, **train}
    for node in spec["nodes"].values():
        if node.get("kind") == "deep_thinking":
            node.update(max_steps=2, demonstrations={**node["demonstrations"], "count": 4})
        elif node["output"]["type"] == "text":
            node["output"]["max_tokens"] = min(node["output"].get("max_tokens", 64), 8)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _model_loaded_once(torch_backend):  # noqa: ANN001 - CLI backends share the session's weights
    return torch_backend


@pytest.mark.parametrize("name", LOCAL_SPECS)
def test_a_two_iteration_fit_of_each_example_spec_runs_from_the_cli(name, tmp_path, capsys):
    spec = tiny_copy(name, tmp_path)
    run = tmp_path / "run"
    main(["fit", str(spec), "--out", str(run), "--cache", str(tmp_path / "cache")])
    printed = capsys.readouterr().out
    assert "whole fit: ~" in printed and f"run directory: {run}" in printed

    plan = compile_spec(spec)
    trainable = any(n.trainable and n.kind == "layer" for n in plan.nodes.values())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == ([0, 1, 2] if trainable else [0])
    assert all(m["dev_acc"] is not None for m in metrics)
    best = yaml.safe_load((run / "best.yaml").read_text())
    assert best["dev_acc"] >= metrics[0]["dev_acc"]  # best-on-dev never ends below the start
    assert (run / "curve.png").stat().st_size > 0
    assert len((run / "predictions" / "dev-best.jsonl").read_text().splitlines()) == 4
    for node in (n for n, p in plan.nodes.items() if p.kind == "deep_thinking"):
        assert (run / "deep_thinking" / f"{node}.safetensors").is_file()
    if any(p.kind == "layer" and not p.is_output and p.trainable for p in plan.nodes.values()):
        posteriors = [json.loads(line) for line in (run / "posteriors.jsonl").read_text().splitlines()]
        assert posteriors and all(abs(sum(c["weight"] for c in p["candidates"]) - 1) < 1e-6 for p in posteriors)

    fitted = tmp_path / "out" / "fitted.yaml"
    main(["export", str(spec), "--checkpoint", str(run / "best.yaml"), "-o", str(fitted)])
    exported = compile_spec(fitted)
    for node, prompt in best["prompts"].items():
        assert exported.spec.nodes[node].prompt == prompt


def test_dry_run_prints_the_projection_and_calls_no_model(tmp_path, capsys):
    spec = tiny_copy("dln2-subj", tmp_path)
    main(["fit", str(spec), "--dry-run", "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")])
    printed = capsys.readouterr().out
    plan = compile_spec(spec)
    assert f"per iteration ~{plan.estimate_per_iteration.calls} batched calls" in printed
    assert f"whole fit: ~{plan.estimate().calls} calls" in printed
    assert "cost: not priced" in printed
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_fitted_prompts_evaluate_with_dlngraph_eval(tmp_path, capsys):
    spec = tiny_copy("dln1-mpqa", tmp_path, iterations=1)
    run = tmp_path / "run"
    main(["fit", str(spec), "--out", str(run), "--cache", str(tmp_path / "cache")])
    best = yaml.safe_load((run / "best.yaml").read_text())
    capsys.readouterr()
    main(["eval", str(spec), "--checkpoint", str(run / "best.yaml"), "--split", "dev", "--limit", "4",
          "--cache", str(tmp_path / "cache")])
    assert f"accuracy on dev: {best['dev_acc']:.4f}" in capsys.readouterr().out
