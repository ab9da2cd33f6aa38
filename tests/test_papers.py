"""Paper protocols (suites/protocols/) and the papers' reported numbers (results/papers/) beside our runs."""

import csv
import functools
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.config import compose, load_entry_config, to_dict
from bench.papers import load_papers
from bench.protocol import validate, variants_for
from bench.registry import METHODS, METRICS, MODELS, PROTOCOLS, SUITES
from bench.stats import bootstrap_mean_ci, wilson_interval

REPO = Path(__file__).resolve().parents[1]
PAPERS = ["di-pp", "dspo", "lasro", "pso"]


@pytest.fixture(scope="module")
def cells():
    return load_papers()


@functools.lru_cache(maxsize=None)
def protocol(name):
    return validate(to_dict(load_entry_config(PROTOCOLS, name)))


# ---- the transcriptions --------------------------------------------------------------------------
def test_paper_presets_run_their_papers_protocol(cells, cli):
    """A preset a paper cell names names that cell's protocol (``base_protocol``), so `bench run method=P`
    without suite= runs the paper's evaluation; an explicit suite= or protocol= wins."""
    from bench.cli import with_base_protocol

    presets = {n: load_entry_config(METHODS, n) for n in METHODS.names()}
    named = {n: p.get("base_protocol") for n, p in presets.items()}
    in_cells = {m for c in cells for m in c["methods"] or [] if m != "base" and presets[m].get("base_model")}  # paper presets (tiny ones stand in for baselines)
    assert in_cells and all(named[m] for m in in_cells), sorted(m for m in in_cells if not named[m])
    for m, proto in named.items():
        if proto:  # the protocol exists and one of its cells is this preset's (a preset may also sit in another paper's table)
            assert any(c["protocol"] == proto and m in (c["methods"] or []) for c in cells), f"{m} names {proto}, which has no cell of it"
    assert with_base_protocol(["method=pso-online-dmd2-official"]) == ["method=pso-online-dmd2-official", "protocol=pso-table1"]
    assert with_base_protocol(["method=dspo-sd15", "suite=smoke"]) == ["method=dspo-sd15", "suite=smoke"]
    assert with_base_protocol(["method=sft"]) == ["method=sft"]  # the tiny-scale presets name none
    code, out, err = cli("run", "method=di-pp-cfg4.5-rew1")
    assert code == 2 and out == "" and "protocol 'di-pp-table1' cannot run in this harness" in err and len(err.strip().splitlines()) == 1




def test_every_paper_file_parses_with_its_tables(cells):
    assert sorted({c["paper"] for c in cells}) == PAPERS
    count = lambda paper, table=None: sum(1 for c in cells if c["paper"] == paper and (table is None or c["table"] == table))
    assert (count("pso", "Table 1"), count("pso", "Table 2"), count("pso", "Table 3"), count("pso", "Table 4")) == (104, 48, 9, 40)
    assert (count("dspo", "Table 1"), count("dspo", "Table 2")) == (60, 60)
    assert count("lasro") == 12 and count("di-pp") == 75
    keys = [(c["paper"], c["table"], c["row"], c["variant"], c["column"]) for c in cells]
    assert len(keys) == len(set(keys)), "two cells of one table share row, variant and column"


def test_every_reference_exists_or_is_null_with_the_papers_name(cells):
    for c in cells:
        where = f"{c['paper']} {c['table']} {c['row']} {c['column']}"
        assert c["metric"] in METRICS.names(), where
        assert c["protocol"] in PROTOCOLS.names(), where
        assert c["suite"] in SUITES.names() if c["suite"] else c["paper_suite"], where
        assert c["model"] in MODELS.names() if c["model"] else c["paper_model"], where
        if c["methods"] is None:
            assert c["paper_method"], where
        else:
            for m in c["methods"]:
                assert m == "base" or m in METHODS.names(), f"{where}: unknown method preset {m}"
        p = protocol(c["protocol"])
        assert p.get("paper") == c["paper"], where
        if c["suite"]:
            assert c["suite"] in p["suites"], f"{where}: protocol {c['protocol']} does not evaluate {c['suite']}"
            assert c["metric"] in p["metrics"], where
        if c["model"]:
            assert c["variant"] in [v["name"] for v in variants_for(p, c["model"])], f"{where}: no variant {c['variant']} for {c['model']}"


@pytest.mark.parametrize(
    "paper, table, row, variant, column, value",
    [
        ("pso", "Table 1", "Parti-Prompts / Online-PSO w/ SDXL-DMD2", "4-step", "PickScore", 23.29),
        ("pso", "Table 1", "Pickapic Test / SDXL-DPO (Wallace et al., 2024)", "50-step", "ImageReward", 1.0075),
        ("pso", "Table 1", "Parti-Prompts / SDXL-DPO + DMD2-LoRA", "4-step", "PickScore", 22.76),  # 22.77 in the prose
        ("pso", "Table 2", "Pickapic Test / Offline-PSO w/ SDXL-Turbo-1step", "1-step", "PickScore", 22.40),  # label regrouped
        ("pso", "Table 2", "Parti-Prompts / Online-PSO w/ SDXL-Turbo-1step", "1-step", "ImageReward", 0.9762),
        ("pso", "Table 3", "DreamBench / (Ours) PSO w/ SDXL-Turbo", "4-step", "DINO", 0.593),
        ("pso", "Table 4", "Parti-Prompts / Online-PSO w/ SDXL-LCM", "4-step", "Aesthetic Score", 5.8572),
        ("dspo", "Table 1", "HPSV2 / DSPO", "50-step", "HPS", 92.56),
        ("dspo", "Table 1", "PickV2 / Diff.-KTO", "50-step", "CLIP", 60.02),
        ("dspo", "Table 2", "PickV2 / Diff.-DPO", "50-step", "Aesthetics", 54.10),
        ("lasro", "Table 1", "+ LaSRO (ours) [SSD-1B-LCM]", "2-step", "Image Reward", 0.998),
        ("lasro", "Table 1", "SDXL-Turbo [61]", "1-step", "Image Reward", 0.817),
        ("di-pp", "Table 1", "MSCOCO-2017 val / DI++ (4.5 cfg + 10.0 reward)", "1-step", "Image Reward", 1.27),
        ("di-pp", "Table 1", "SAM-LLaVA-Caption10M / DI++ (4.5 cfg + 10.0 reward)*", "1-step", "Image Reward", 1.44),
        ("di-pp", "Table 1", "MSCOCO-2017 val / SDXL-Turbo (Sauer et al., 2024)", "1-step", "Aes Score", 5.33),
    ],
)
def test_spot_checked_values_match_the_seed_papers(cells, paper, table, row, variant, column, value):
    found = [c for c in cells if (c["paper"], c["table"], c["row"], c["variant"], c["column"]) == (paper, table, row, variant, column)]
    assert len(found) == 1 and found[0]["value"] == value


def test_the_mappings_the_papers_leave_open(cells):
    pick = next(c for c in cells if c["paper"] == "di-pp" and c["column"] == "Pick Score")
    assert pick["scale"] == 0.01  # printed as a cosine
    dspo = next(c for c in cells if c["paper"] == "dspo")
    assert (dspo["statistic"], dspo["scale"]) == ("winrate", 100.0)
    base = [c for c in cells if c["paper"] == "pso" and c["row"] == "Pickapic Test / SDXL-DMD2"]
    assert {c["methods"][0] for c in base} == {"base"} and {c["model"] for c in base} == {"sdxl-dmd2"}
    online = next(c for c in cells if c["row"] == "Parti-Prompts / Online-PSO w/ SDXL-DMD2")
    assert online["methods"] == ["pso-online-dmd2", "pso-online-dmd2-official"]
    assert all(c["suite"] is None for c in cells if c["paper"] == "di-pp")


# ---- protocols -----------------------------------------------------------------------------------


def test_ls_protocols_lists_them_and_names_the_inexpressible(cli):
    code, out, _ = cli("ls", "protocols")
    assert code == 0
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^  (\S+)\s+(.*)$", out, re.M)}
    assert {"pso-table1", "pso-table2", "pso-table3", "pso-table4", "dspo-table1", "dspo-table2", "lasro-table1", "di-pp-table1"} <= set(lines)
    assert "NOT EXPRESSIBLE" in lines["di-pp-table1"] and "PixArt-alpha" in lines["di-pp-table1"]
    assert "[partly:" in lines["lasro-table1"] and "[partly" not in lines["dspo-table1"]  # PNDM and Euler are card samplers now
    assert "NOT EXPRESSIBLE" not in lines["pso-table1"] and "[partly" not in lines["pso-table2"]


def test_protocol_cells_fix_suite_seeds_sampler_and_metrics(mini_data):
    from bench.protocol import expand

    args = ["protocol=dspo-table1", "method=dspo-sd15", "suite.limit=2"]
    cells = expand(to_dict(compose(args)), args)
    assert len(cells) == 3 * 5  # three suites x five seeds, one variant
    cfg = to_dict(compose(args, cell=cells[0]))
    assert cfg["suite"]["name"] == "pickapic" and cfg["suite"]["prompts"]["hub"] == "yuvalkirstain/pickapic_v2_no_images"
    assert (cfg["gen"]["steps"], cfg["gen"]["guidance"], cfg["suite"]["limit"]) == (50, 7.5, 2)
    assert cfg["suite"]["metrics"] == ["pickscore", "hpsv2", "aesthetic", "clip-h14", "imagereward"]
    assert cfg["protocol"]["cell"]["variant"] == "50-step" and cfg["protocol"]["cell"]["model"] == "sd15"

    args = ["protocol=pso-table2", "method=pso-online-turbo", "protocol.suites.parti.source=/p.tsv"]
    cells = expand(to_dict(compose(args)), args)
    assert [(c["suite"], c["record"]["variant"], c["set"]["gen.steps"]) for c in cells] == [
        ("pickapic", "4-step", 4), ("pickapic", "1-step", 1), ("parti", "4-step", 4), ("parti", "1-step", 1)
    ]
    assert to_dict(compose(args, cell=cells[2]))["suite"]["source"] == "/p.tsv"  # one suite's local source
    assert to_dict(compose(args, cell=cells[0]))["suite"]["source"] is None

    args = ["protocol=lasro-table1", "method=lasro-sdxl-turbo"]
    cells = expand(to_dict(compose(args)), args)
    assert all(c["set"]["train.keep_checkpoints"] is True for c in cells)

    args = ["protocol=pso-table3", "method=pso-dreambooth-turbo", f"suite.source={mini_data / 'dreambench'}"]
    cells = expand(to_dict(compose(args)), args)  # one training and evaluation per DreamBench subject (the stand-in has 4)
    assert [c["record"]["subject"] for c in cells] == ["backpack", "backpack_dog", "cat", "dog"] and cells[0]["set"]["subject"] == cells[0]["record"]["subject"] and cells[0]["set"]["suite.images_per_prompt"] == 4
    assert [c["record"]["subject"] for c in expand(to_dict(compose([*args, "subject=dog"])), [*args, "subject=dog"])] == ["dog"]


def test_protocol_refusals_are_one_line(cli):
    code, _, err = cli("run", "protocol=di-pp-table1", "method=di-pp-cfg4.5-rew10")
    assert code != 0 and "PixArt-alpha" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("run", "protocol=pso-tabel1", "method=sft")
    assert code != 0 and "unknown protocol 'pso-tabel1'; did you mean pso-table1" in err
    code, _, err = cli("run", "protocol=pso-table2", "method=pso-offline-turbo", "seed=3", "gen.steps=2")
    assert code != 0 and "fixes seed, gen.steps" in err and "protocol.seeds=[0]" in err


def test_keeping_checkpoints_changes_no_other_checkpoints_key():
    from bench.trainer import train_identity

    tc = to_dict(compose(["method=sft"]))["train"]
    assert tc["keep_checkpoints"] is False
    assert train_identity(tc) == {k: v for k, v in tc.items() if k not in ("save_every", "keep_checkpoints", "log_with")}  # as before the flag (log_with: where curves go)
    kept = train_identity(tc | {"keep_checkpoints": True})
    assert kept["keep_checkpoints"] is True and kept["save_every"] == tc["save_every"]  # which steps are kept is part of it


# ---- the leaderboard -----------------------------------------------------------------------------


def write_run(root: Path, run_id: str, method: str, values: dict[str, list[float]], protocol: dict | None, baseline=None, model="sdxl-dmd2", scorers="official", sets=None):
    """A finished run folder: manifest, summary and per-image scores (one image per prompt)."""
    folder = root / run_id
    folder.mkdir(parents=True)
    n = len(next(iter(values.values())))
    frame = pd.DataFrame({"prompt_index": range(n), "image_index": 0, "prompt": [f"p{i}" for i in range(n)], "seed": range(n), "image_key": [f"k{i}" for i in range(n)], **values})
    frame.to_parquet(folder / "scores.parquet")
    summary = {"metrics": {m: {"mean": float(np.mean(v)), "ci": [0, 0], "higher_is_better": True, "version": "1", "scale": "x"} for m, v in values.items()}, "winrate": {}, "n_images": n, "n_prompts": n, "level": 0.95}
    if sets:
        summary["sets"] = {m: {"value": v, "higher_is_better": False, "protocol": {}, "n_images": n, "n_reference": n} for m, v in sets.items()}
    manifest = {
        "run_id": run_id, "suite": (protocol or {}).get("suite", "micro"), "model": model, "method": method, "baseline": baseline, "scorers": scorers,
        "config": {"method": {"name": method} if method != "base" else None, "stats": {"n_boot": 500, "level": 0.95, "seed": 0}},
        **({"protocol": protocol} if protocol else {}),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


TOY = """
paper: toy
tables:
  - table: Table 1
    protocol: toy-proto
    statistic: mean
    columns:
      Bright: {metric: brightness}
    rows:
      - {row: Base, suite: micro, model: sdxl-dmd2, methods: [base], variant: 4-step, values: {Bright: 0.5}}
      - {row: Tuned, suite: micro, model: sdxl-dmd2, methods: [sft, sft-other], variant: 4-step, values: {Bright: 0.9}}
      - {row: Not run, suite: micro, model: sdxl-dmd2, methods: null, variant: 4-step, values: {Bright: 0.7}}
  - table: Table 2
    protocol: toy-proto
    statistic: winrate
    scale: 100
    columns:
      Bright: {metric: brightness}
    rows:
      - {row: Tuned, suite: micro, model: sdxl-dmd2, methods: [sft], variant: 4-step, values: {Bright: 75.0}}
"""


def record(seed, **kw):
    return {"name": "toy-proto", "paper": "toy", "suite": "micro", "variant": "4-step", "seed": seed, "subject": None, "model": "sdxl-dmd2", "seeds": [0, 1], **kw}


def test_leaderboard_pools_seeds_per_prompt_and_resamples_prompts(cli, tmp_path):
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "toy.yaml").write_text(TOY)
    runs = tmp_path / "runs"
    base = {0: [0.4, 0.5, 0.6, 0.5], 1: [0.5, 0.5, 0.4, 0.6]}
    tuned = {0: [0.8, 0.9, 0.6, 1.0], 1: [0.9, 0.5, 0.4, 0.7]}
    for seed in (0, 1):
        write_run(runs, f"micro-base-{seed}", "base", {"brightness": base[seed]}, record(seed))
        write_run(runs, f"micro-sft-{seed}", "sft", {"brightness": tuned[seed]}, record(seed), baseline=f"micro-base-{seed}")
    # a checkpoint the protocol's selection did not keep, and a run outside any protocol: neither is matched
    write_run(runs, "micro-sft-step1", "sft", {"brightness": [0.0] * 4}, record(0, selection={"selected": False}), baseline="micro-base-0")
    write_run(runs, "micro-plain", "sft", {"brightness": [0.9] * 4}, None)

    code, out, err = cli("leaderboard", f"out={runs}", f"papers={papers}")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO((runs / "papers.csv").read_text())))
    by = {(r["table"], r["row"]): r for r in rows}
    per_prompt = (np.array(tuned[0]) + np.array(tuned[1])) / 2
    mean, (lo, hi) = bootstrap_mean_ci(per_prompt, 500, 0.95, 0)
    t = by[("Table 1", "Tuned")]
    assert (t["status"], t["method"], t["prompts"], t["seeds"]) == ("compared", "sft", "4", "2")
    assert float(t["ours"]) == pytest.approx(mean) and float(t["ci_low"]) == pytest.approx(lo) and float(t["ci_high"]) == pytest.approx(hi)
    assert float(t["difference"]) == pytest.approx(mean - 0.9) and t["inside"] == str(lo <= 0.9 <= hi)
    b = by[("Table 1", "Base")]
    assert float(b["ours"]) == pytest.approx(0.5) and b["inside"] == "True"
    assert by[("Table 1", "Not run")]["status"] == "reported" and by[("Table 1", "Not run")]["ours"] == ""
    # win rate: per prompt and seed against the base image of the same seed (ties one half), averaged over seeds, x100
    wins = np.array([[1, 1, 0.5, 1], [1, 0.5, 0.5, 1]]).mean(axis=0)
    w = by[("Table 2", "Tuned")]
    assert float(w["ours"]) == pytest.approx(100 * wins.mean()) and float(w["difference"]) == pytest.approx(100 * wins.mean() - 75)
    assert float(w["ci_low"]) == pytest.approx(100 * wilson_interval(wins.sum(), 4, 0.95)[0])  # prompts' wins, Wilson's interval
    md = (runs / "papers.md").read_text()
    assert "| toy     | Table 1 | Not run" in md and "reported" in md and "95% CI" in md
    assert len(rows) == 4


TOY_SET = """
paper: toy
tables:
  - table: Table 3
    protocol: toy-proto
    statistic: mean
    columns:
      Bright: {metric: brightness}
      FID: {metric: fid, statistic: set}
    rows:
      - {row: Base, suite: micro, model: sdxl-dmd2, methods: [base], variant: 4-step, values: {Bright: 0.5, FID: 12.0}}
"""


def test_stand_ins_tiny_scorers_missing_seeds_and_set_metrics_are_flagged(cli, tmp_path):
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "toy.yaml").write_text(TOY_SET)
    runs = tmp_path / "runs"
    write_run(runs, "micro-base-0", "base", {"brightness": [0.5, 0.5]}, record(0), model="tiny-sdxl-fewstep", scorers="tiny", sets={"fid": 12.5})
    code, out, err = cli("leaderboard", f"out={runs}", f"papers={papers}")
    assert code == 0, err
    rows = {r["column"]: r for r in csv.DictReader(io.StringIO((runs / "papers.csv").read_text()))}
    assert rows["Bright"]["note"] == "stand-in model tiny-sdxl-fewstep; scorers=tiny: scores NOT meaningful; 1 of 2 seeds"
    assert (float(rows["Bright"]["ci_low"]), float(rows["Bright"]["ci_high"]), rows["Bright"]["inside"]) == (0.5, 0.5, "True")
    fid = rows["FID"]  # a set-level value has no interval: ours, the difference, no inside/outside
    assert (float(fid["ours"]), float(fid["difference"]), fid["ci_low"], fid["inside"], fid["status"]) == (12.5, 0.5, "", "", "compared")
    assert "| 12.5   | -" in (runs / "papers.md").read_text()


def test_leaderboard_papers_over_micro_runs_shows_the_four_papers_reported(cli, tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "micro-tiny-base-x", "base", {"brightness": [0.4, 0.6]}, None, model="tiny")
    write_run(runs, "micro-tiny-sft-y", "sft", {"brightness": [0.7, 0.8]}, None, model="tiny", baseline="micro-tiny-base-x")
    code, out, err = cli("leaderboard", f"out={runs}", "papers=true")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO((runs / "papers.csv").read_text())))
    assert {r["paper"] for r in rows} == set(PAPERS) and {r["status"] for r in rows} == {"reported"}
    assert len(rows) == 408
    assert "| pso     | Table 2 | Parti-Prompts / Online-PSO w/ SDXL-Turbo-1step" in out
    code, out, err = cli("leaderboard", f"out={runs}", "papers=lasro")
    assert code == 0 and len(list(csv.DictReader(io.StringIO((runs / "papers.csv").read_text())))) == 12
    code, out, _ = cli("leaderboard", f"out={runs}")  # the plain leaderboard is unchanged
    assert code == 0 and "# Leaderboard" in out and "reported" not in out


# ---- a protocol run, end to end ------------------------------------------------------------------

MICRO_TOY = {
    "description": "a toy protocol on micro", "paper": "toy", "tables": ["Table 1"],
    "suites": {"micro": {}}, "images_per_prompt": 1, "seeds": [0], "metrics": ["brightness"],
    "variants": {"default": [{"name": "1-step", "steps": 1}]},
    "per_subject": False, "checkpoint": {"select": "highest", "metric": "brightness"}, "model": None, "expressible": True,
}


@pytest.mark.slow  # a protocol run with kept checkpoints (about 9 s)
def test_protocol_run_keeps_the_best_checkpoint_and_sits_beside_its_paper_cell(cli, cache_dir, tmp_path):
    PROTOCOLS.add("micro-toy", MICRO_TOY)
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "toy.yaml").write_text(TOY.replace("toy-proto", "micro-toy").replace("4-step", "1-step"))
    prompts = tmp_path / "train.txt"
    prompts.write_text("a red apple\na blue car\n")
    common = ["model=tiny-onestep", "model.build.pretrain.steps=0", "suite.limit=2", "protocol.model=sdxl-dmd2"]
    code, out, err = cli(
        "run", "protocol=micro-toy", "method=sft", *common, "train.steps=2", "train.save_every=1", "train.batch_size=2",
        "method.samples_per_prompt=2", f"method.train_prompts={prompts}",
    )
    assert code == 0, err
    runs = tmp_path / "runs"
    manifests = {p.parent.name: json.loads(p.read_text()) for p in runs.rglob("manifest.json")}
    tuned = {k: m for k, m in manifests.items() if m["method"] != "base"}
    assert sorted(m["protocol"]["checkpoint_step"] for m in tuned.values()) == [1, 2]  # the kept step and the final one
    values = {m["protocol"]["checkpoint_step"]: json.loads((runs / k / "summary.json").read_text())["metrics"]["brightness"]["mean"] for k, m in tuned.items()}
    chosen = max(values, key=lambda s: (values[s], -s))
    for m in tuned.values():
        sel = m["protocol"]["selection"]
        assert sel["chosen_step"] == chosen and sel["selected"] == (m["protocol"]["checkpoint_step"] == chosen)
        assert (m["protocol"]["name"], m["protocol"]["variant"], m["protocol"]["model"], m["model"]) == ("micro-toy", "1-step", "sdxl-dmd2", "tiny-onestep")
    base_dir = next(k for k, m in manifests.items() if m["method"] == "base")
    assert base_dir in out

    code, out, err = cli("eval", "protocol=micro-toy", *common)  # the base model alone: the same run, its images from the store
    assert code == 0, err
    assert base_dir in out

    code, out, err = cli("leaderboard", f"out={runs}", f"papers={papers}")
    assert code == 0, err
    rows = {r["row"]: r for r in csv.DictReader(io.StringIO((runs / "papers.csv").read_text())) if r["table"] == "Table 1"}
    assert rows["Tuned"]["status"] == "compared" and float(rows["Tuned"]["ours"]) == pytest.approx(values[chosen])
    kept = next(k for k, m in tuned.items() if m["protocol"]["selection"]["selected"])
    ci = json.loads((runs / kept / "summary.json").read_text())["metrics"]["brightness"]["ci"]  # one image per prompt, one seed:
    assert [float(rows["Tuned"]["ci_low"]), float(rows["Tuned"]["ci_high"])] == pytest.approx(ci)  # the run's own interval
    assert rows["Tuned"]["inside"] in ("True", "False") and rows["Tuned"]["difference"] != ""
    assert rows["Base"]["status"] == "compared" and rows["Base"]["note"].startswith("stand-in model tiny-onestep; overrides: model.build.pretrain.steps=0 suite.limit=2")
    assert "train.steps=2" in rows["Tuned"]["note"] and "train.steps=2" not in rows["Base"]["note"]
    assert rows["Not run"]["status"] == "reported"


@pytest.mark.slow
def test_pso_table2_protocol_with_tiny_stand_ins_meets_the_papers_cells(cli, pairs_parquet, tmp_path, mini_data):
    """`bench run protocol=pso-table2 method=pso-offline-turbo` on the SDXL-layout tiny model standing in for
    SDXL-Turbo, tiny scorers and 2-prompt prefixes of the stand-in Pick-a-Pic and PartiPrompts files."""
    pickapic = mini_data / "pickapic" / "test_unique_500" / "pickscore_eval_500.jsonl"
    parti = mini_data / "partiprompts" / "PartiPrompts.tsv"
    code, out, err = cli(
        "run", "protocol=pso-table2", "method=pso-offline-turbo", "model=tiny-sdxl-fewstep", "protocol.model=sdxl-turbo",
        f"protocol.suites.pickapic.source={pickapic}", f"protocol.suites.parti.source={parti}", "suite.limit=2", "scorers=tiny",
        f"data={pairs_parquet}", "data.shuffle_buffer=0", "train.steps=2", "train.batch_size=2", "train.save_every=100",
    )
    assert code == 0, err
    runs = tmp_path / "runs"
    code, out, err = cli("leaderboard", f"out={runs}", "papers=pso")
    assert code == 0, err
    rows = [r for r in csv.DictReader(io.StringIO((runs / "papers.csv").read_text())) if r["table"] == "Table 2" and r["status"] == "compared"]
    compared = {(r["row"], r["column"]) for r in rows}
    assert len(rows) == 2 * 2 * 2 * 4  # base and offline PSO, two suites, two step counts, four metrics
    assert ("Parti-Prompts / Offline-PSO w/ SDXL-Turbo-1step", "ImageReward") in compared
    assert all("scorers=tiny" in r["note"] and r["difference"] for r in rows)
