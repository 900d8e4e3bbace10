"""`dlngraph run`, `eval` and `cache` end to end on the real embedded model
(in-process, so the session's model is reused), including bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli_runner import invoke

pytestmark = pytest.mark.model

POSITIVE = ["I absolutely loved this film, it was wonderful!", "The best concert of my life, pure joy."]
NEGATIVE = ["Terrible service, rude staff, I hated every minute.", "Awful, boring and a complete waste of money."]
DEV = [{"input": x, "target": "positive"} for x in POSITIVE] + [{"input": x, "target": "negative"} for x in NEGATIVE]


def write_spec(root: Path, *, backend: dict | None = None, dev_lines: list[str] | None = None) -> Path:
    spec = {
        "name": "sentiment",
        "backends": {"local": backend or {"kind": "torch", "batch_size": 4}},
        "data": {"dev": "data/dev.jsonl"},
        "inputs": ["input"],
        "nodes": {
            "sentiment": {
                "prompt": "Is the sentiment of this review positive or negative?",
                "template": "{{ prompt }}\n\nReview: {{ input }}\nSentiment:",
                "output": {"type": "choice", "choices": ["positive", "negative"]},
            }
        },
        "outputs": {"sentiment": "target"},
    }
    (root / "data").mkdir(parents=True, exist_ok=True)
    lines = dev_lines if dev_lines is not None else [json.dumps(d) for d in DEV]
    (root / "data" / "dev.jsonl").write_text("\n".join(lines) + "\n")
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_eval_twice_second_makes_no_model_call(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dlngraph.api import evaluate

    spec = write_spec(tmp_path)
    preds = tmp_path / "preds.jsonl"
    code, out, err = invoke(capsys, "eval", spec, "--split", "dev", "--out", preds, "--cache", cache_dir)
    assert code == 0, err
    assert "accuracy on dev: 1.0000 (4/4)" in out
    assert "model calls: 1," in out
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert [(r["input"], r["target"], r["prediction"], r["correct"]) for r in rows] == [
        (d["input"], d["target"], d["target"], True) for d in DEV
    ]
    code, out, err = invoke(capsys, "eval", spec, "--out", tmp_path / "again.jsonl", "--cache", cache_dir)
    assert code == 0, err
    assert "model calls: 0, cache hits: 8" in out
    assert (tmp_path / "again.jsonl").read_text() == preds.read_text()
    # An existing predictions file is replaced only with --force.
    preds.write_text("stale\n")
    code, out, err = invoke(capsys, "eval", spec, "--out", preds, "--cache", cache_dir)
    assert code == 2 and "already exists" in err and preds.read_text() == "stale\n"
    assert invoke(capsys, "eval", spec, "--out", preds, "--cache", cache_dir, "--force")[0] == 0
    assert preds.read_text() == (tmp_path / "again.jsonl").read_text()
    assert evaluate(spec, "dev", cache_dir=cache_dir).model_calls == 0


def test_checkpoint_prompts_are_applied(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dlngraph.api import evaluate

    spec = write_spec(tmp_path)
    learned = "Tell whether this review is happy (positive) or unhappy (negative)."
    checkpoint = tmp_path / "best.yaml"
    checkpoint.write_text(yaml.safe_dump({"prompts": {"sentiment": learned}, "iteration": 3}))
    code, out, err = invoke(capsys, "eval", spec, "--checkpoint", checkpoint, "--cache", cache_dir, "--limit", "2")
    assert code == 0, err
    assert "model calls: 1," in out and "/2)" in out
    # The checkpoint run asked exactly what the learned prompt asks, not what the spec's prompt asks.
    assert evaluate(spec, "dev", cache_dir=cache_dir, limit=2, prompts={"sentiment": learned}).model_calls == 0
    assert evaluate(spec, "dev", cache_dir=cache_dir, limit=2).model_calls == 1


def test_run_prints_every_node_output(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path)
    code, out, err = invoke(capsys, "run", spec, "--input", json.dumps({"input": POSITIVE[0]}), "--cache", cache_dir)
    assert code == 0, err
    assert out.splitlines() == ["example 1", "  sentiment: positive"]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("\n".join(json.dumps({"input": x}) for x in NEGATIVE) + "\n")
    code, out, err = invoke(capsys, "run", spec, "--input-file", inputs, "--json", "--no-cache")
    assert code == 0, err
    assert [json.loads(line)["outputs"] for line in out.splitlines()] == [{"sentiment": "negative"}] * 2


def test_cache_stats_and_clear(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path)
    invoke(capsys, "run", spec, "--input", json.dumps({"input": "Fine."}), "--cache", cache_dir)
    code, out, _ = invoke(capsys, "cache", "stats", "--cache", cache_dir)
    assert code == 0 and ": 2 entries" in out and "torch score" in out
    code, out, _ = invoke(capsys, "cache", "clear", "--cache", cache_dir)
    assert code == 0 and out.startswith("removed 2 entries")
    assert ": 0 entries" in invoke(capsys, "cache", "stats", "--cache", cache_dir)[1]


def test_a_damaged_cache_is_set_aside_and_the_run_goes_on(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path)
    example = json.dumps({"input": "Fine."})
    assert invoke(capsys, "run", spec, "--input", example, "--cache", cache_dir)[0] == 0
    path = cache_dir / "cache.sqlite"
    path.write_bytes(b"overwritten by something else\n" * 200)
    code, out, err = invoke(capsys, "run", spec, "--input", example, "--cache", cache_dir, "--json")
    assert code == 0 and json.loads(out)["outputs"] == {"sentiment": "positive"}
    [aside] = cache_dir.glob("cache.sqlite.corrupt-*")
    assert f"the response cache {path} is damaged" in err and str(aside) in err and "Traceback" not in err
    assert ": 2 entries" in invoke(capsys, "cache", "stats", "--cache", cache_dir)[1]  # rebuilt and refilled


def assert_clean_failure(result: tuple[int, str, str], *needles: str) -> None:
    code, out, err = result
    assert code != 0
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_a_clear_error_without_traceback(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = write_spec(tmp_path / "missing", backend={"kind": "torch", "model": str(tmp_path / "no-model")})
    assert_clean_failure(invoke(capsys, "eval", missing, "--cache", cache_dir), "no-model", "no config.json")

    not_lm = tmp_path / "not-lm"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"model_type": "t5"}))
    spec = write_spec(tmp_path / "notlm", backend={"kind": "torch", "model": str(not_lm)})
    assert_clean_failure(
        invoke(capsys, "eval", spec, "--cache", cache_dir), "node 'sentiment'", "'t5' model, not a causal language model"
    )

    spec = write_spec(tmp_path / "long")
    long_input = json.dumps({"input": "word " * 9000})
    assert_clean_failure(invoke(capsys, "run", spec, "--input", long_input, "--no-cache"), "node 'sentiment'", "context")

    # The compiler checks the spec's data files; the runtime checks what it reads itself.
    bad_json = write_spec(tmp_path / "badjson", dev_lines=[json.dumps(DEV[0]), "{not json"])
    assert_clean_failure(invoke(capsys, "eval", bad_json, "--cache", cache_dir), "dev.jsonl:2")
    no_target = write_spec(tmp_path / "nofield", dev_lines=[json.dumps(DEV[0]), json.dumps({"input": "x"})])
    assert_clean_failure(invoke(capsys, "eval", no_target, "--cache", cache_dir), "dev.jsonl", "target")
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"input": "fine"}\n\n{"input": "ok"\n')
    assert_clean_failure(invoke(capsys, "run", spec, "--input-file", inputs), "inputs.jsonl:3", "not valid JSON")
    inputs.write_text('{"input": "fine"}\n{"text": "ok"}\n')
    assert_clean_failure(invoke(capsys, "run", spec, "--input-file", inputs), "inputs.jsonl:2", "missing field 'input'")

    assert_clean_failure(invoke(capsys, "run", spec, "--input", '{"text": "x"}'), "--input #1", "missing field 'input'")

    checkpoint = tmp_path / "bad.yaml"
    checkpoint.write_text(yaml.safe_dump({"prompts": {"nosuchnode": "x"}}))
    assert_clean_failure(invoke(capsys, "eval", spec, "--checkpoint", checkpoint), "unknown node(s) nosuchnode")
    checkpoint.write_text("just a string\n")
    assert_clean_failure(invoke(capsys, "eval", spec, "--checkpoint", checkpoint), "no `prompts:` mapping")
