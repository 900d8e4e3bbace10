"""`dlngraph report`: unit tests on a fabricated run directory, and a headless-browser test
on the report of a real 2-iteration fit of the embedded model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from dlngraph.cli import main
from dlngraph.report import load_run, render_page, write_report
from dlngraph.report.diagram import layout, network_svg
from dlngraph.report.worddiff import word_diff

HOSTILE = "<script>alert('x')</script> & \"quotes\""
ARTIFACTS = Path(__file__).resolve().parents[1] / "runs"  # CI keeps runs/ as artifacts
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    # Any attempt to reach a host fails, so a page that needs the network shows errors.
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
)


def _plan() -> dict:
    def node(name, output_type, parents, children, target):
        return {
            "backend": "local", "backend_kind": "torch", "children": children, "choices": [],
            "inputs": ["input"], "kind": "layer", "name": name, "output_type": output_type,
            "parents": parents, "target": target, "trainable": True,
        }

    return {
        "name": "toy-dln2",
        "spec": "spec.yaml",
        "nodes": {
            "answer": node("answer", "choice", ["reason"], [], "target"),
            "reason": node("reason", "text", [], ["answer"], None),
        },
        "think": [],
        "forward": [{"index": 0, "nodes": ["reason"], "calls": []}, {"index": 1, "nodes": ["answer"], "calls": []}],
        "backward": [],
        "estimate": {},
    }


PROMPTS = [
    {"reason": "Think step by step.", "answer": "Answer the question."},
    {"reason": "Think step by step about the facts.", "answer": "Answer the question."},
    {"reason": "Think step by step about the facts.", "answer": "Answer with one word: the label."},
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def fabricate_run(root: Path) -> Path:
    """A run directory as the trainer's contract describes it: 2 iterations of a DLN-2."""
    run = root / "toy-dln2-20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "spec.yaml").write_text(f"name: toy-dln2\ndescription: {json.dumps(HOSTILE)}\n", encoding="utf-8")
    (run / "plan.json").write_text(json.dumps(_plan()), encoding="utf-8")
    metrics = [
        {
            "iteration": i, "train_acc": [0.4, 0.5, 0.7][i], "dev_acc": [0.45, None, 0.6][i],
            "loss": {"answer": [1.2, 0.9, 0.7][i], "reason": [2.0, 1.5, 1.4][i]},
            "accepted": {"answer": i == 2, "reason": i == 1}, "calls": 10 + i, "requests": 100 * (i + 1),
            "prompt_tokens": 1000 * (i + 1), "completion_tokens": 50 * i, "cost": 0.0, "seconds": 1.5 + i,
        }
        for i in range(3)
    ]
    _write_jsonl(run / "metrics.jsonl", list(reversed(metrics)))  # the loader sorts
    for i, prompts in enumerate(PROMPTS):
        checkpoint = {"iteration": i, "seed": 42, "prompts": prompts, "best": {"iteration": i}}
        (run / "checkpoints" / f"iter-{i:04d}.yaml").write_text(yaml.safe_dump(checkpoint), encoding="utf-8")
    best = {"iteration": 2, "dev_acc": 0.6, "prompts": PROMPTS[2]}
    (run / "best.yaml").write_text(yaml.safe_dump(best), encoding="utf-8")
    _write_jsonl(
        run / "posteriors.jsonl",
        [
            {
                "iteration": it, "node": "reason", "example": ex, "input": f"sentence {ex} {HOSTILE}",
                "candidates": [
                    {"text": f"because {ex}a", "weight": 0.7}, {"text": f"because {ex}b", "weight": 0.3},
                    {"text": "", "weight": 0.0},
                ],
                "chosen": f"because {ex}a",
            }
            for it in (1, 2)
            for ex in (5, 1, 3, 4)
        ],
    )
    rows = [{"index": i, "input": f"dev {i}", "target": "yes"} for i in range(4)]
    _write_jsonl(
        run / "predictions" / "dev-initial.jsonl",
        [{**r, "prediction": p, "correct": p == "yes"} for r, p in zip(rows, ["no", "yes", "no", "yes"])],
    )
    _write_jsonl(
        run / "predictions" / "dev-best.jsonl",
        [{**r, "prediction": p, "correct": p == "yes"} for r, p in zip(rows, ["yes", "yes", "no", "no"])],
    )
    return run


def test_word_diff_marks_removed_and_added_words() -> None:
    assert word_diff("Answer the question.", "Answer the <b> question.") == "Answer the <ins>&lt;b&gt; </ins>question."
    assert word_diff("Answer the question.", "Answer it.") == "Answer <del>the question</del><ins>it</ins>."
    assert word_diff("same text", "same text") == "same text"
    # Spaces between changed words join them into one replaced phrase.
    assert word_diff("Read the review, then pick one.", "Read the short text, then pick one.") == (
        "Read the <del>review</del><ins>short text</ins>, then pick one."
    )
    # A rewrite sharing few words is shown replaced whole, not as word salad.
    assert word_diff("Classify the sentence.", "To improve it, be concise.") == (
        "<del>Classify the sentence.</del> <ins>To improve it, be concise.</ins>"
    )


def test_layout_puts_inputs_stages_and_targets_in_columns() -> None:
    boxes, edges = layout(_plan())
    columns = {b.key: b.col for b in boxes}
    assert columns == {"in:input": 0, "node:reason": 1, "node:answer": 2, "out:target": 3}
    assert ("node:reason", "node:answer") in edges and ("node:answer", "out:target") in edges
    assert edges == sorted(edges)


def test_a_plan_without_nodes_draws_an_empty_diagram() -> None:
    assert layout({"nodes": {}, "forward": []}) == ([], [])
    assert "no nodes" in network_svg({"nodes": {}, "forward": []})


def test_report_of_fabricated_run_has_every_section(tmp_path: Path) -> None:
    run = load_run(fabricate_run(tmp_path))
    assert [m["iteration"] for m in run.metrics] == [0, 1, 2]
    html = render_page(run)

    for anchor in ("network", "curves", "prompts", "posteriors", "flips", "usage", "spec"):
        assert f'id="{anchor}"' in html
    assert 'class="network"' in html and html.count('class="box ') == 4
    assert 'data-series="train"' in html and 'data-series="dev"' in html
    # dev is null at iteration 1: the dev curve has two points, train three.
    dev_series = re.search(r'data-series="dev">(.*?)</g>', html).group(1)
    assert dev_series.count("<circle") == 2
    # Prompt history: the reason node changed once (iteration 1), answer once (iteration 2).
    assert "accepted at iteration 1" in html and "accepted at iteration 2" in html
    assert "Think step by step<ins> about the facts</ins>." in html
    # Posteriors: the last iteration only, the first 3 examples by index, chosen marked.
    assert html.count('class="example"') == 3
    assert "example 1" in html and "example 5" not in html
    assert html.count("(empty)") == 3  # an empty sample is named, not left blank
    # Predictions: index 0 fixed, index 3 broken, 1 and 2 unchanged.
    assert "2 of 4 dev examples changed prediction" in html and "1 fixed, 1 broken" in html
    # Totals over iterations 0..2.
    assert ">33<" in html and ">6,000<" in html


def test_flips_show_every_field_of_multi_output_predictions(tmp_path: Path) -> None:
    run = fabricate_run(tmp_path)
    for which, prediction in (("initial", "no"), ("best", "yes")):
        row = {"index": 0, "input": {"a": "x<1", "b": "y"}, "target": {"answer": "yes", "why": "because"},
               "prediction": {"answer": prediction, "why": "because"}, "correct": prediction == "yes"}
        _write_jsonl(run / "predictions" / f"dev-{which}.jsonl", [row])
    html = render_page(load_run(run))
    assert "1 of 1 dev examples changed" in html
    assert "a: x&lt;1\nb: y" in html and "answer: no\nwhy: because" in html and "answer: yes\nwhy: because" in html


def test_report_escapes_run_text_and_fetches_nothing(tmp_path: Path) -> None:
    html = render_page(load_run(fabricate_run(tmp_path)))
    assert "<script" not in html.lower()
    assert "&lt;script&gt;" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?https?:""", html)


def test_report_cli_writes_and_opens_the_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    run = fabricate_run(tmp_path)
    out = tmp_path / "out" / "page.html"
    main(["report", str(run), "-o", str(out), "--open"])
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert str(out) in capsys.readouterr().out
    assert opened == [out.resolve().as_uri()]


def test_report_of_a_directory_that_is_not_a_run_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path)])
    assert exc.value.code == 1


def test_write_report_defaults_next_to_the_run(tmp_path: Path) -> None:
    run = fabricate_run(tmp_path)
    (run / "posteriors.jsonl").unlink()
    path = write_report(run)
    assert path == run / "report.html"
    assert 'id="posteriors"' not in path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- headless browser


@pytest.fixture
def browser(tmp_path: Path):
    """Headless Chromium driven by selenium; skipped only when Chromium or selenium is absent."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("headless Chromium is absent: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is absent: pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def _check_in_browser(driver, page: Path, screenshot: str) -> dict:
    """Load PAGE; assert no console errors and no request leaving file://; save a full-page screenshot."""
    for kind in ("browser", "performance"):  # drop what the start-up page logged
        driver.get_log(kind)
    driver.get(page.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    sent = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    requested = [
        m["params"]["request"]["url"]
        for m in sent
        if m["method"] == "Network.requestWillBeSent" and m["params"].get("documentURL") == page.resolve().as_uri()
    ]
    assert requested and all(url.startswith(("file:", "data:")) for url in requested), requested
    # Geometry of what must render: a drawn box has a size.
    found = driver.execute_script(
        """
        const size = (el) => {
          const r = el.getBoundingClientRect();
          return [Math.round(r.width), Math.round(r.height)];
        };
        const all = (sel) => Array.from(document.querySelectorAll(sel));
        return {
          network: all('svg.network').map(size),
          boxes: all('svg.network g.box').map((g) => g.dataset.key).sort(),
          edges: all('svg.network path.edge').length,
          charts: all('svg.chart').map(
            (el) => [el.getAttribute('class'), el.querySelectorAll('polyline').length].concat(size(el))
          ),
          steps: all('.step').map((el) => Number(el.dataset.iteration)),
          diffs: all('.step ins, .step del').length,
          height: document.documentElement.scrollHeight,
        };
        """
    )
    assert found["network"] and min(found["network"][0]) > 40
    assert any(k.startswith("in:") for k in found["boxes"]) and any(k.startswith("out:") for k in found["boxes"])
    assert found["edges"] >= len(found["boxes"]) - 1
    assert found["charts"] and all(c[1] >= 1 and c[2] > 100 and c[3] > 100 for c in found["charts"])
    ARTIFACTS.mkdir(exist_ok=True)
    driver.set_window_size(1200, min(found["height"] + 40, 16000))
    assert driver.save_screenshot(str(ARTIFACTS / screenshot))
    return found


def test_browser_renders_fabricated_report(browser, tmp_path: Path) -> None:
    page = write_report(fabricate_run(tmp_path))
    found = _check_in_browser(browser, page, "report-fabricated.png")
    assert sorted(c[0] for c in found["charts"]) == ["chart accuracy", "chart loss"]
    assert found["steps"] == [0, 1, 0, 2] and found["diffs"] >= 2
    # The hostile spec text stayed text: no alert dialog, no injected element.
    assert browser.execute_script("return document.querySelectorAll('script').length") == 0


@pytest.mark.model
def test_browser_renders_report_of_a_real_fit(browser, tmp_path: Path) -> None:
    """`dlngraph init` (DLN-2) -> a real 2-iteration `dlngraph fit` on the embedded model -> report -> Chromium."""
    spec_path = tmp_path / "net" / "spec.yaml"
    main(["init", str(spec_path.parent), "--template", "dln2"])
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    spec["train"].update(batch_size=4, prompt_proposals=2, posterior_samples=2, dev_size=8)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    run_dir = tmp_path / "run"
    main(["fit", str(spec_path), "--iterations", "2", "--out", str(run_dir), "--cache", str(tmp_path / "cache")])
    main(["report", str(run_dir)])
    page = run_dir / "report.html"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(page, ARTIFACTS / "report-fit.html")

    found = _check_in_browser(browser, page, "report-fit.png")
    assert found["boxes"] == ["in:input", "node:answer", "node:reason", "out:target"]
    run = load_run(run_dir)
    assert [m["iteration"] for m in run.metrics] == [0, 1, 2]
    # Every accepted change of a prompt is one step, drawn as a diff against the step before.
    changes = sum(
        1
        for before, after in zip(run.checkpoints, run.checkpoints[1:])
        for node in ("answer", "reason")
        if before["prompts"][node] != after["prompts"][node]
    )
    assert found["steps"].count(0) == 2  # the initial prompt of each node
    assert len(found["steps"]) - 2 == changes
    assert (found["diffs"] > 0) == (changes > 0)
    assert browser.find_elements("css selector", "#posteriors .example")  # DLN-2: hidden-node samples shown
