import json
import shutil

import pandas as pd
import pytest

from bench.errors import DataError, UsageError
from bench.report import (
    check,
    collect_runs,
    format_check,
    leaderboard,
    load_baseline,
    render_table,
    summarize,
)
from bench.io import write_json

METRICS = {
    "brightness": {"higher_is_better": True, "version": "1", "scale": "[0,1]"},
    "dist": {"higher_is_better": False, "version": "2", "scale": ">=0"},
}


def _scores(per_image: dict[str, list[float]]) -> pd.DataFrame:
    """3 prompts x 2 images, metric values listed prompt-major."""
    n = len(next(iter(per_image.values())))
    df = pd.DataFrame(
        {
            "prompt_index": [i // 2 for i in range(n)],
            "image_index": [i % 2 for i in range(n)],
            "prompt": [f"p{i // 2}" for i in range(n)],
            "seed": list(range(n)),
            "image_key": [f"{i // 2}_{i % 2}" for i in range(n)],
        }
    )
    for name, vals in per_image.items():
        df[name] = vals
    return df


RUN = _scores({"brightness": [0.4, 0.6, 0.8, 0.6, 0.2, 0.2], "dist": [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]})
# Per-prompt run means: brightness 0.5, 0.7, 0.2; dist 0.1, 0.2, 0.3.
BASE = _scores({"brightness": [0.3, 0.3, 0.7, 0.7, 0.5, 0.5], "dist": [0.2, 0.2, 0.3, 0.3, 0.4, 0.4]})


def test_summarize_means_and_winrates():
    s = summarize(RUN, METRICS, BASE, n_boot=200, baseline_id="base-run")
    assert s["n_images"] == 6 and s["n_prompts"] == 3
    b = s["metrics"]["brightness"]
    assert b["mean"] == pytest.approx(2.8 / 6)
    assert b["ci"][0] <= b["mean"] <= b["ci"][1]
    assert (b["higher_is_better"], b["version"], b["scale"]) == (True, "1", "[0,1]")
    assert s["metrics"]["dist"]["mean"] == pytest.approx(0.2)
    # brightness: win (0.5>0.3), tie (0.7=0.7), loss (0.2<0.5) -> 0.5
    assert s["winrate"]["brightness"]["value"] == pytest.approx(0.5)
    assert s["winrate"]["brightness"]["n_prompts"] == 3
    assert s["winrate"]["brightness"]["baseline"] == "base-run"
    # dist is lower-is-better and the run is lower on every prompt -> 1.0
    assert s["winrate"]["dist"]["value"] == 1.0
    assert s["winrate"]["dist"]["ci"] == [pytest.approx(3 / (3 + 1.959963984540054**2)), 1.0]  # Wilson at 3 of 3: never [1, 1]
    # paired differences per prompt: brightness 0.2, 0, -0.3; dist -0.1 on each
    assert s["delta"]["brightness"]["value"] == pytest.approx(-0.1 / 3)
    assert s["delta"]["dist"]["value"] == pytest.approx(-0.1) and s["delta"]["dist"]["p_value"] == pytest.approx(0.25)  # 2 of 8 sign flips as extreme
    assert s["delta"]["dist"]["verdict"] == "no detected change"  # 3 prompts cannot show it
    json.dumps(s, allow_nan=False)  # plain Python types only


def test_summarize_without_baseline_and_bad_input():
    s = summarize(RUN, METRICS, None, n_boot=50)
    assert s["winrate"] == {}
    with pytest.raises(DataError, match="dist"):
        summarize(RUN.drop(columns="dist"), METRICS, None)
    with pytest.raises(DataError, match="same prompts"):
        summarize(RUN, METRICS, BASE[BASE.prompt_index < 2])


def test_render_table():
    text = render_table(summarize(RUN, METRICS, BASE, n_boot=200), "micro / sd / lora")
    lines = text.splitlines()
    assert lines[0] == "# micro / sd / lora"
    assert "95% CI" in lines[2] and "win rate vs base" in lines[2]
    row = next(line for line in lines if line.startswith("| brightness"))
    assert "0.4667" in row and "↑" in row and "| 0.5 [" in row
    assert "↓" in next(line for line in lines if line.startswith("| dist"))
    assert "Δ vs base" in lines[2] and "p (Holm)" in lines[2] and "-0.03333 [" in row
    no_base = render_table(summarize(RUN, METRICS, None, n_boot=50), "t")
    assert "win rate vs base" not in no_base and "Δ vs base" not in no_base and "detectable Δ" in no_base


def test_write_json_is_byte_identical(tmp_path):
    s1 = summarize(RUN, METRICS, BASE, n_boot=200)
    s2 = summarize(RUN, METRICS, BASE, n_boot=200)
    write_json(tmp_path / "a.json", s1)
    write_json(tmp_path / "b.json", s2)
    a, b = (tmp_path / "a.json").read_bytes(), (tmp_path / "b.json").read_bytes()
    assert a == b and a.endswith(b"}\n")
    assert json.loads(a) == s1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temp files left


def _make_run(folder, run_id, suite, model, method, summary):
    folder.mkdir(parents=True)
    manifest = {"run_id": run_id, "suite": suite, "model": model, "method": method, "config_hash": "abc"}
    write_json(folder / "manifest.json", manifest)
    if summary is not None:
        write_json(folder / "summary.json", summary)


def test_leaderboard_one_row_per_run(tmp_path):
    with_base = summarize(RUN, METRICS, BASE, n_boot=50, baseline_id="b")
    no_base = summarize(BASE, METRICS, None, n_boot=50)
    _make_run(tmp_path / "micro" / "r2", "r2", "micro", "sd", "lora", with_base)
    _make_run(tmp_path / "micro" / "r1", "r1", "micro", "sd", "base", no_base)
    _make_run(tmp_path / "micro" / "r3", "r3", "micro", "sd", "dpo", None)  # not evaluated yet

    df = collect_runs(tmp_path)
    assert list(df.columns) == ["run_id", "suite", "model", "method", "brightness", "brightness win", "dist", "dist win", "brightness verdict", "dist verdict"]
    assert list(df.run_id) == ["r1", "r2"]  # sorted by method: base < lora
    assert df.loc[1, "brightness win"] == pytest.approx(0.5)
    assert pd.isna(df.loc[0, "brightness win"])

    out = tmp_path / "out"
    md_path, csv_path, md = leaderboard(tmp_path, out)
    assert md_path == out / "leaderboard.md" and csv_path == out / "leaderboard.csv"
    assert md_path.read_text(encoding="utf-8") == md
    assert len(pd.read_csv(csv_path)) == 2
    assert sum(line.startswith(("| r1 ", "| r2 ")) for line in md.splitlines()) == 2


def test_leaderboard_puts_each_tuned_run_beside_its_base_and_keeps_the_named_metrics(tmp_path):
    with_base = summarize(RUN, METRICS, BASE, n_boot=50, baseline_id="b")
    _make_run(tmp_path / "r2", "r2", "micro", "sd", "lora", with_base)
    _make_run(tmp_path / "r1", "r1", "micro", "sd", "base", summarize(BASE, METRICS, None, n_boot=50))
    md = leaderboard(tmp_path, tmp_path / "out")[2]
    against = md.split("## Against each run's base model\n\n")[1].splitlines()
    assert [c.strip() for c in against[0].split("|")[1:-1]] == ["method", "model", "run_id", "Δ brightness", "win brightness", "Δ dist", "win dist"]
    d, w = with_base["delta"]["dist"], with_base["winrate"]["dist"]
    row = [c.strip() for c in against[2].split("|")[1:-1]]  # one row: the base has nothing to be compared with
    assert row[:3] == ["lora", "sd", "r2"] and against[3] == "" and row[5] == f"-0.1 [{d['ci'][0]:.4g}, {d['ci'][1]:.4g}]" and row[6] == f"1 [{w['ci'][0]:.4g}, 1]"
    for step in (10, 9):  # checkpoints in step order, not in the order of their names' characters
        _make_run(tmp_path / f"c{step}", f"c{step}", "micro", "sd", f"lora@step{step}", summarize(RUN[["prompt_index", "image_index", "prompt", "seed", "image_key", "dist"]], {"dist": METRICS["dist"]}, BASE, n_boot=50))
    rows = leaderboard(tmp_path, tmp_path / "out")[2].split("## Against each run's base model")[1].splitlines()[4:7]
    assert [r.split("|")[1].strip() for r in rows] == ["lora", "lora@step9", "lora@step10"] and rows[1].split("|")[4].strip() == "-"  # no brightness in those runs
    runs = leaderboard(tmp_path, tmp_path / "out")[2].split("## Against")[0]
    assert runs.index("| c9 ") < runs.index("| c10 ")  # the runs' table in the same order
    only = leaderboard(tmp_path, tmp_path / "out", ["dist"])[2]
    assert "brightness" not in only and [c.strip() for c in only.splitlines()[2].split("|")[1:-1]] == ["run_id", "suite", "model", "method", "dist", "dist win"]
    with pytest.raises(UsageError, match=r"^metrics=clip: no run under .* was compared with its base on it"):
        leaderboard(tmp_path, tmp_path / "out", ["dist", "clip"])


def test_leaderboard_html_draws_each_protocol_training_over_its_kept_checkpoints(tmp_path):
    """A protocol that evaluates every kept checkpoint (micro-overoptimization) gets one chart per training:
    each metric's difference from the base at every step, in the suite's order; other runs get none."""
    with_base = summarize(RUN, METRICS, BASE, n_boot=50, baseline_id="b")
    for step in (25, 50):
        _make_run(tmp_path / f"s{step}", f"s{step}", "micro", "world", f"refl@step{step}", with_base)
        manifest = json.loads((tmp_path / f"s{step}" / "manifest.json").read_text())
        manifest |= {"protocol": {"name": "curve", "variant": "default", "seed": 0, "checkpoint_step": step}, "config": {"suite": {"metrics": ["dist", "brightness"]}}}
        write_json(tmp_path / f"s{step}" / "manifest.json", manifest)
    _make_run(tmp_path / "r9", "r9", "micro", "world", "sft", with_base)
    leaderboard(tmp_path, tmp_path / "out")
    html = (tmp_path / "out" / "leaderboard.html").read_text(encoding="utf-8")
    assert html.count("<h2>Over training</h2>") == 1 and html.count("<svg") == 1
    chart = html[html.index("<svg"):]
    assert "refl on micro (world, default, seed 0), protocol curve" in chart
    assert chart.index("Δ dist") < chart.index("Δ brightness") and chart.count(">optimizer step<") == 2
    for name in ("s25", "s50"):
        shutil.rmtree(tmp_path / name)
    leaderboard(tmp_path, tmp_path / "out")
    assert "Over training" not in (tmp_path / "out" / "leaderboard.html").read_text(encoding="utf-8")


def test_leaderboard_errors(tmp_path):
    with pytest.raises(DataError, match="no runs with summary.json"):
        leaderboard(tmp_path)
    _make_run(tmp_path / "r1", "r1", "micro", "sd", "base", None)
    (tmp_path / "r1" / "summary.json").write_text("{not json")
    with pytest.raises(DataError, match="summary.json"):
        collect_runs(tmp_path)


def test_check_gate():
    s = summarize(RUN, METRICS, BASE, n_boot=50)
    rows = check(
        s,
        {
            "metrics.brightness.mean": {"value": 0.47, "abs_tol": 0.01},  # 0.4667: inside
            "metrics.dist.mean": {"value": 0.25, "abs_tol": 0.01},  # 0.2: outside
            "winrate.brightness.value": {"min": 0.6},  # 0.5: too low
            "winrate.dist.value": {"min": 0.9, "max": 1.0},  # 1.0: inside
            "metrics.clip.mean": {"max": 1.0},  # missing
        },
    )
    by_key = {r["key"]: r for r in rows}
    assert [r["ok"] for r in rows] == [True, False, False, True, False]
    assert by_key["metrics.clip.mean"]["got"] is None
    assert by_key["metrics.dist.mean"]["got"] == pytest.approx(0.2)
    assert by_key["winrate.dist.value"]["expected"] == ">= 0.9 and <= 1"
    table = format_check(rows)
    assert table.count("FAIL") == 3 and "missing" in table


def test_check_edge_of_tolerance_passes():
    rows = check({"a": {"b": 0.53}}, {"a.b": {"value": 0.51, "abs_tol": 0.02}})
    assert rows[0]["ok"]


def test_load_baseline(tmp_path):
    good = tmp_path / "gate.yaml"
    good.write_text("metrics.brightness.mean: {value: 0.5, abs_tol: 0.02}\nwinrate.brightness.value: {min: 0.6}\n")
    assert load_baseline(good)["winrate.brightness.value"] == {"min": 0.6}
    js = tmp_path / "gate.json"
    js.write_text(json.dumps({"n_images": {"min": 6}}))
    assert load_baseline(js) == {"n_images": {"min": 6}}

    for name, text in [
        ("broken.json", "{oops"),
        ("list.json", "[1, 2]"),
        ("typo.json", json.dumps({"k": {"value": 1, "abs_tolerance": 0.1}})),
        ("notol.json", json.dumps({"k": {"value": 1}})),
        ("text.yaml", "k: {min: high}\n"),
    ]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError, match=name):
            load_baseline(path)
    with pytest.raises(DataError, match="not found"):
        load_baseline(tmp_path / "nope.json")


def test_a_scoped_metric_is_summarized_over_its_own_prompts_only():
    nan = float("nan")
    scores = pd.DataFrame({"prompt_index": [0, 0, 1, 1, 2, 2], "set": ["a", "a", "a", "a", "b", "b"], "m": [1.0, 2.0, 3.0, 4.0, nan, nan], "n": [nan, nan, nan, nan, 5.0, 7.0]})
    base = scores.assign(m=[0.0, 0.0, 9.0, 9.0, nan, nan], n=[nan, nan, nan, nan, 1.0, 1.0])
    infos = {"m": {"higher_is_better": True, "version": "1", "scale": "s", "prompts": [0, 1]}, "n": {"higher_is_better": True, "version": "1", "scale": "s", "prompts": [2]}}
    s = summarize(scores, infos, base, n_boot=50, group_by=["set"])
    assert s["metrics"]["m"]["mean"] == 2.5 and s["metrics"]["m"]["n_images"] == 4 and s["metrics"]["n"]["mean"] == 6.0
    assert s["winrate"]["m"]["value"] == 0.5 and s["winrate"]["m"]["n_prompts"] == 2 and s["winrate"]["n"]["n_prompts"] == 1
    assert s["by_group"][0]["means"] == {"m": {"a": 2.5}, "n": {"b": 6.0}}
    table = render_table(s, "t")
    assert [line for line in table.splitlines() if line.startswith("| a")][0].split("|")[4].strip() == "-"  # out of scope
    assert [line for line in table.splitlines() if line.startswith("| b")][0].split("|")[3].strip() == "-"
    scores.loc[0, "m"] = nan  # an in-scope NaN is still an error
    with pytest.raises(DataError, match="NaN"):
        summarize(scores, infos, None, n_boot=50)
