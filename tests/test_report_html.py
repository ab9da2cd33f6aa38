"""report.html and leaderboard.html: escaping, one grid cell per image, a self-contained page, the grid cap,
missing images, the training log (train.jsonl) and its resume; then a real tiny `bench run` opened in
headless Chromium (skipped, in one line, without chromium or playwright).

The first tests build run folders by hand (scores, summary from ``report.summarize``, images in a store),
so they need no model; the browser test runs `bench run suite=smoke method=sft` on a 3-prompt stand-in file
whose second prompt is an HTML tag, for 4 training steps.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.generate import ImageStore
from bench.html_report import write_report
from bench.report import leaderboard, summarize
from bench.trainlog import TrainLog, read_train_log, train_log_path

XSS = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
PROMPTS = ["a red apple", XSS, "a blue car", "a green field"]
CATEGORIES = ["food", "<b>odd</b>", "vehicle", "food"]  # a group column, its labels user text too
METRICS = {"brightness": {"higher_is_better": True, "version": "1", "scale": "luma"}, "t2i-spatial-owlv2": {"higher_is_better": True, "version": "1", "scale": "score; NON-CANONICAL (UniDet unavailable)"}}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def fake_run(out: Path, cache: Path, method: str, shift: float, baseline: str | None = None, images: int = 2, **manifest) -> Path:
    """A finished run folder of ``len(PROMPTS)`` prompts x ``images`` (a solid grey image each, its brightness the
    score), its images in ``cache``'s store, as ``Session.evaluate`` leaves one."""
    run_id = f"micro-tiny-{method}-{round(shift * 100):08d}"
    folder = out / run_id
    folder.mkdir(parents=True)
    store = ImageStore(cache / "images")
    rows = []
    for p, prompt in enumerate(PROMPTS):
        for i in range(images):
            value = round(0.2 + 0.1 * p + 0.05 * i + shift * (p % 2 * 2 - 1 if p else 1), 4)
            key = f"{method}{p:02d}{i:02d}".ljust(40, "0")
            store.save(key, np.full((32, 32, 3), int(value * 255), dtype=np.uint8))
            rows.append({"prompt_index": p, "image_index": i, "prompt": prompt, "seed": 100 * p + i, "image_key": key, "category": CATEGORIES[p],
                         "brightness": value, "t2i-spatial-owlv2": value / 2})
    scores = pd.DataFrame(rows)
    scores.to_parquet(folder / "scores.parquet")
    base = pd.read_parquet(out / baseline / "scores.parquet") if baseline else None
    summary = summarize(scores, METRICS, base, n_boot=50, baseline_id=baseline, group_by=["category"], n_permutations=99)
    (folder / "summary.json").write_text(json.dumps(summary))
    record = {"run_id": run_id, "suite": "micro", "model": "tiny", "method": method, "baseline": baseline, "scorers": "official", "n_prompts": len(PROMPTS),
              "prompt_source": "/prompts.txt", "published_prompt_set": None, "seeds": {"base_seed": 0}, "identity": {"images_per_prompt": images, "sampler": {"kind": "ddim", "steps": 4}},
              "metrics": {k: {"version": v["version"], "scale": v["scale"]} for k, v in METRICS.items()}, "config": {"cache_dir": str(cache), "suite": {"limit": None}}, "image_store": str(store.root)}
    (folder / "manifest.json").write_text(json.dumps(record | manifest))
    return folder


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    out, cache = tmp_path / "runs", tmp_path / "cache"
    base = fake_run(out, cache, "base", 0.0)
    return base, fake_run(out, cache, "sft", 0.1, baseline=base.name)


def cells(html: str) -> int:
    return len(re.findall(r'<figure class="cell"', html))


def test_the_report_escapes_prompts_and_has_one_cell_per_image(runs):
    base, tuned = runs
    html = write_report([tuned]).read_text(encoding="utf-8")
    assert (tuned / "report.html").is_file()
    assert ESCAPED in html and XSS not in html  # the prompt is text, in the grid and nowhere as markup
    assert cells(html) == 2 * len(PROMPTS) * 2  # base and tuned, 2 images per prompt
    assert html.count('<div class="pair"') == len(PROMPTS) * 2 and html.count('<div class="prompt"') == len(PROMPTS)
    assert html.count("data:image/png;base64,") == 2 * len(PROMPTS) * 2
    assert html.count('data-kind="means"') == 2 and html.count('data-kind="groups"') == 2 and html.count("<svg") == 4  # per metric: overall, by category
    assert '<select class="group-filter" data-column="category">' in html and '<option value="&lt;b&gt;odd&lt;/b&gt;">' in html
    assert "<b>odd</b>" not in html and html.count("&lt;b&gt;odd&lt;/b&gt;") >= 3  # the filter, the prompt's line, the charts' labels
    # self-contained: no URL at all (no script, style, font or image from a server)
    assert "http://" not in html and "https://" not in html and not re.search(r'(src|href)="(?!data:|#)', html)
    assert "t2i-spatial-owlv2 is non-canonical" in html  # a warning of its own
    delta = json.loads((tuned / "summary.json").read_text())["delta"]["brightness"]["value"]
    assert f">{delta:+.4g}" in html  # the paired difference from the base, in the headline table


def test_the_report_is_byte_identical_and_caps_the_grid(runs, tmp_path):
    base, tuned = runs
    first = write_report([tuned]).read_bytes()
    assert write_report([tuned]).read_bytes() == first
    capped = write_report([tuned], tmp_path / "capped.html", max_prompts=2).read_text(encoding="utf-8")
    assert cells(capped) == 2 * 2 * 2 and "the grid shows 2 of 4 prompts" in capped
    shown = [int(i) for i in re.findall(r'<div class="prompt" id="prompt-(\d+)"', capped)]
    gains = (pd.read_parquet(tuned / "scores.parquet").groupby("prompt_index")["brightness"].mean()
             - pd.read_parquet(base / "scores.parquet").groupby("prompt_index")["brightness"].mean()).abs()
    assert sorted(shown) == sorted(gains.sort_values(ascending=False, kind="stable").index[:2].tolist())


def test_a_missing_image_is_a_cell_that_says_so(runs, tmp_path):
    base, tuned = runs
    html = write_report([tuned], tmp_path / "r.html", cache_dir=tmp_path / "elsewhere").read_text(encoding="utf-8")
    assert cells(html) == 16 and html.count("image not in the store") == 16 and "16 of 16 images are not in the image store" in html
    shutil.rmtree(tmp_path / "cache" / "images" / "ba")  # some of the base's images (keys start with "ba")
    html = write_report([tuned], tmp_path / "r2.html").read_text(encoding="utf-8")
    assert cells(html) == 16 and html.count("image not in the store") == 8


def test_bench_report_compares_runs_and_refuses_bad_arguments(cli, runs, tmp_path):
    base, tuned = runs
    other = fake_run(tmp_path / "runs", tmp_path / "cache", "dpo", 0.2, baseline=base.name)
    code, out, _ = cli("report", f"run={base}", f"run={tuned}", f"run={other}", f"out={tmp_path / 'three.html'}")
    assert code == 0 and out.strip() == f"report: {tmp_path / 'three.html'}"
    html = (tmp_path / "three.html").read_text(encoding="utf-8")
    assert cells(html) == 3 * len(PROMPTS) * 2 and "difference from base" in html
    code, _, err = cli("report", f"run={tmp_path}")
    assert code == 3 and err.strip().endswith("point run= at a finished run folder (bench run / bench eval print it)") and err.count("\n") == 1
    code, _, err = cli("report", f"run={tuned}", "report.max_prompts=0")
    assert code == 2 and "report.max_prompts=0: out of range; use an integer >= 1 (default 200)" in err
    code, _, err = cli("report", f"run={tuned}", "runs=x")
    assert code == 2 and "`bench report` takes cache_dir, out, report.max_prompts, run; got runs" in err


def test_leaderboard_html_is_sortable_with_marks(runs, tmp_path):
    base, tuned = runs
    fake_run(tmp_path / "runs", tmp_path / "cache", "tiny-sft", 0.1, baseline=base.name, scorers="tiny",
             config={"suite": {"limit": 4}}, prompt_source=f"/data/{XSS}.txt", published_prompt_set=False)
    other = fake_run(tmp_path / "runs", tmp_path / "cache", "dpo", 0.2, baseline=base.name)
    sweep = tmp_path / "runs" / "micro-tiny-dpo-seeds-00000000"  # a seed sweep of one run, in place of it
    sweep.mkdir()
    (sweep / "manifest.json").write_text(json.dumps({"run_id": sweep.name, "suite": "micro", "model": "tiny", "method": "dpo", "scorers": "official",
                                                     "sweep": {"axes": {"seed": [0, 1]}, "runs": [other.name]}}))
    (sweep / "summary.json").write_text(json.dumps({"metrics": {"brightness": {"mean": 0.5, "sd": 0.25}}}))
    write_report([tuned])
    leaderboard(tmp_path / "runs")
    html = (tmp_path / "runs" / "leaderboard.html").read_text(encoding="utf-8")
    assert html.count('<th class="sortable"') >= 10 and "<script>" in html and "http" not in html
    rows = re.findall(r"<tr>\n<td>(micro-tiny-[^<]+)</td>", html)
    assert len(rows) == 4 and sweep.name in rows and other.name not in rows
    sweep_row = html.split(f"<td>{sweep.name}</td>")[1].split("</tr>")[0]
    assert ">0.5 ± 0.25</td>" in sweep_row and "<td>seeds 0, 1</td>" in sweep_row and 'data-sort="4">4</td>' in sweep_row  # prompts: its run's
    assert ESCAPED in html and XSS not in html
    for mark in ("tiny", "subset", "unpublished", "non-canonical"):
        assert f'<span class="mark {mark}" title=' in html
    assert f'<a href="{tuned.name}/report.html">report</a>' in html


def test_train_log_is_cut_back_on_resume_and_skips_a_torn_line(tmp_path):
    log = TrainLog(tmp_path, 0)
    for step in range(1, 8):
        log.write(step, 1.0 / step, 1e-3, {"implicit_acc": 0.5, "round": 1, "note": "text"})
    with open(tmp_path / "train.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 8, "lo')  # a kill in the middle of a line
    rows = read_train_log(tmp_path / "train.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows[0] == {"step": 1, "loss": 1.0, "lr": 1e-3, "implicit_acc": 0.5, "round": 1.0}
    TrainLog(tmp_path, 5).write(6, 0.25, 1e-3, {})  # resumed from the checkpoint of step 5
    assert [r["step"] for r in read_train_log(tmp_path / "train.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert train_log_path(tmp_path / "final") == tmp_path / "train.jsonl" == train_log_path(tmp_path / "kept" / "step-0000005")


# ---- a real run, in the browser -------------------------------------------------------------------
@pytest.fixture(scope="module")
def xss_run(cache_dir, tmp_path_factory) -> Path:
    """`bench run suite=smoke method=sft` on 3 prompts (the second an HTML tag, in a file named by it) and 4
    training steps on 4 training prompts; returns the out folder."""
    root = tmp_path_factory.mktemp("xss-run")
    source = root / f"{XSS}.txt"
    source.write_text("a red apple\n" + XSS + "\na blue car\n", encoding="utf-8")
    (root / "train.txt").write_text("a lamp\na cup\na tree\na boat\n", encoding="utf-8")
    out = root / "runs"
    args = ["suite=smoke", "method=sft", f"suite.source={source}", f"method.train_prompts={root / 'train.txt'}", "train.steps=4",
            "method.samples_per_prompt=2", "train.batch_size=4", "train.lr=1e-3"]
    assert main(["run", *args, f"cache_dir={cache_dir}", f"out={out}"]) == 0
    return out


def test_a_real_run_writes_its_report_and_train_log(xss_run):
    tuned = next(xss_run.glob("smoke-tiny-sft-*"))
    base = next(xss_run.glob("smoke-tiny-base-*"))
    manifest = json.loads((tuned / "manifest.json").read_text())
    rows = read_train_log(manifest["checkpoint"]["train_log"])
    history = json.loads((Path(manifest["checkpoint"]["path"]) / "train.json").read_text())["history"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["loss"] for r in rows] == history and all(r["lr"] == 1e-3 for r in rows)
    html = (tuned / "report.html").read_text(encoding="utf-8")
    assert cells(html) == 12 and (base / "report.html").is_file() and cells((base / "report.html").read_text(encoding="utf-8")) == 6
    assert 'data-kind="training"' in html and ESCAPED in html and XSS not in html


@pytest.fixture(scope="module")
def browser():
    """playwright's sync API, or a skip naming what is missing (before the run a browser test would open)."""
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: `apt-get install chromium` (Debian's package) to open the report in a browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install playwright (the system's chromium is used, no browser download)")
    return sync_playwright


def open_page(pw, path: Path, shot: Path):
    """Open a page from disk in headless Chromium: its console errors, the dialogs it tried to open, the page."""
    chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    errors, dialogs = [], []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    return chromium, page, errors, dialogs


def test_the_report_in_headless_chromium(browser, xss_run, runs, tmp_path):
    sync_playwright = browser
    tuned = next(xss_run.glob("smoke-tiny-sft-*"))
    main(["leaderboard", f"out={xss_run}"])
    with sync_playwright() as pw:
        chromium, page, errors, dialogs = open_page(pw, tuned / "report.html", tmp_path / "report.png")
        try:
            assert page.locator("figure.cell").count() == 12 and page.locator("figure.cell img").count() == 12  # 3 prompts x 2 images x (base, sft)
            assert page.locator("div.pair").count() == 6 and all(page.locator("div.pair").nth(i).locator("figure.cell").count() == 2 for i in range(6))
            assert page.locator("figure.chart svg").count() >= 5 and page.locator('figure.chart[data-kind="training"] svg').count() == 1
            assert page.locator(".prompt-text", has_text=XSS).count() == 1  # shown as text
            assert page.locator('img[src="x"]').count() == 0
            page.select_option("#sort-order", "loss")  # the sort runs, keeps every prompt
            assert page.locator("#shown-count").inner_text() == "3"
        finally:
            chromium.close()
        assert errors == [] and dialogs == []
        chromium, page, errors, dialogs = open_page(pw, xss_run / "leaderboard.html", tmp_path / "leaderboard.png")
        try:
            assert page.locator("#leaderboard tbody tr").count() == 2 and page.get_by_text(XSS).count() == 2  # the prompt file's name, as text
            page.locator("th", has_text="prompts").first.click()
            assert page.locator("th[aria-sort]").count() == 1
        finally:
            chromium.close()
        assert errors == [] and dialogs == []
        chromium, page, errors, dialogs = open_page(pw, write_report([runs[1]]), tmp_path / "groups.png")  # a suite with groups
        try:
            page.select_option("select.group-filter", "food")
            assert page.locator("#shown-count").inner_text() == "2" and page.locator("div.prompt:visible").count() == 2
            page.select_option("select.group-filter", "")
            page.select_option("#sort-order", "gain")
            order = [int(i) for i in page.locator("div.prompt").evaluate_all("els => els.map(e => e.dataset.index)")]
            per = (pd.read_parquet(runs[1] / "scores.parquet").groupby("prompt_index")["brightness"].mean()
                   - pd.read_parquet(runs[0] / "scores.parquet").groupby("prompt_index")["brightness"].mean())  # the gains: per-prompt differences
            assert order == sorted(per.index, key=lambda i: (-per[i], i)) and len(order) == len(PROMPTS)
        finally:
            chromium.close()
        assert errors == [] and dialogs == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_log_with_names_a_tracker_and_a_missing_package_is_one_warning(monkeypatch, tmp_path, caplog):
    import importlib.util

    from bench.config import compose, to_dict
    from bench.errors import UsageError
    from bench.trainer import train_identity
    from bench.trainlog import tracker_kwargs

    tc = to_dict(compose(["method=sft", "train.log_with=tensorboard"]))["train"]
    assert tc["log_with"] == "tensorboard" and "log_with" not in train_identity(tc)  # no checkpoint key
    with pytest.raises(UsageError, match=r"train.log_with=mlflow: not allowed; use one of tensorboard, wandb, or null"):
        compose(["method=sft", "train.log_with=mlflow"])
    assert tracker_kwargs(None, tmp_path) == {}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert tracker_kwargs("wandb", tmp_path) == {}
    assert "train.log_with=wandb: the wandb package is not installed (pip install wandb); logging to train.jsonl only" in caplog.text
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert tracker_kwargs("tensorboard", tmp_path) == {"log_with": "tensorboard", "project_dir": str(tmp_path / "trackers")}
