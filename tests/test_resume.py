"""Killing `dlngraph fit` and resuming it, on the real embedded model, in subprocesses.

Both runs use --no-cache: every response of both runs is computed by the model,
so equal results show that the resumed run restores the trainer's whole state
(prompts, best, early-stop counters, the seed) AND that every random draw is
seeded by (seed, iteration, purpose) rather than by process history. With a
shared cache the resumed run would replay the killed run's answers, which would
hide exactly the non-determinism this test is meant to catch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_fit_cli import tiny_copy

pytestmark = pytest.mark.model

TIMEOUT = 1800  # seconds per fit; generous, the CPU may be shared


def fit(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dlngraph", "fit", *args, "--no-cache"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A test run started in the background inherits SIGINT ignored; a user's terminal does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.is_file():
        assert process.poll() is None, f"fit ended before {path.name}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {path.name} after {TIMEOUT} s"
        time.sleep(0.2)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err
    return out


def last_checkpoint(run: Path) -> dict:
    return yaml.safe_load(sorted((run / "checkpoints").glob("iter-*.yaml"))[-1].read_text())


def metrics_without_timing(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "seconds"} for m in lines]


def test_a_run_killed_mid_iteration_and_resumed_ends_like_an_uninterrupted_one(tmp_path):
    spec = tiny_copy(
        "dln1-mpqa", tmp_path, iterations=2, prompt_proposals=3, dev_size=2, proposal_max_tokens=16, patience=10
    )
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(fit(str(spec), "--out", str(whole), "--seed", "5"))

    process = fit(str(spec), "--out", str(killed), "--seed", "5")
    wait_for(killed / "checkpoints" / "iter-0001.yaml", process)
    os.kill(process.pid, signal.SIGKILL)  # iteration 2 has started: its checkpoint is written last
    process.wait()
    assert not (killed / "checkpoints" / "iter-0002.yaml").exists()

    finish(fit(str(spec), "--resume", str(killed)))
    assert last_checkpoint(killed)["iteration"] == last_checkpoint(whole)["iteration"] == 2
    assert last_checkpoint(killed)["prompts"] == last_checkpoint(whole)["prompts"]
    assert yaml.safe_load((killed / "best.yaml").read_text()) == yaml.safe_load((whole / "best.yaml").read_text())
    # Every loss, acceptance, accuracy and token count matches, line for line.
    assert metrics_without_timing(killed) == metrics_without_timing(whole)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    spec = tiny_copy("dln1-mpqa", tmp_path, iterations=2, dev_size=2)
    run = tmp_path / "run"
    process = fit(str(spec), "--out", str(run))
    wait_for(run / "checkpoints" / "iter-0000.yaml", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130
    assert f"--resume {run}" in err
    assert last_checkpoint(run)["iteration"] >= 0 and (run / "best.yaml").is_file()
