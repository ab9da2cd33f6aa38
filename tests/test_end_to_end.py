"""End to end through the CLI: byte-reproducible scores, batch-size invariance, cached re-runs,
SIGKILL during generation and during training, corrupt cache entries, one-line errors, and the
ls / leaderboard / check commands.

Small settings throughout (4 prompts, 2 samples per training prompt, a dozen training steps);
the tiny model is built once into the session cache and copied into every fresh cache, so a
"fresh" cache regenerates every image and trains from scratch without rebuilding the model.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bench.cli import main
from bench.config import compose, stable_hash, to_dict
from bench.generate import image_seed
from bench.models import pipeline_location

REPO = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = (REPO / "suites" / "smoke" / "eval.txt").read_text(encoding="utf-8").splitlines()
METRICS = ["brightness", "colorfulness", "jpeg_compressibility", "contrast"]
ID_COLUMNS = ["prompt_index", "image_index", "prompt", "seed", "image_key"]
SMALL = ["suite=smoke", "suite.limit=4"]
SFT_ARGS = ["suite=smoke", "method=sft", "suite.limit=4", "train.steps=12", "train.save_every=4", "method.samples_per_prompt=2"]


# ---- helpers -----------------------------------------------------------------------------------
def bench_main(*argv: str) -> int:
    """The CLI in-process, outside the function-scoped ``cli`` fixture (for module fixtures)."""
    return main(list(argv))


def fresh_cache(root: Path, session_cache: Path, data: bool = False, images: bool = False) -> Path:
    """A new cache holding only a copy of the built model (plus, on request, sft data or images)."""
    root.mkdir(parents=True)
    shutil.copytree(session_cache / "models", root / "models")
    if data:
        shutil.copytree(session_cache / "data", root / "data")
    if images:
        shutil.copytree(session_cache / "images", root / "images")
    return root


def pngs(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "images").rglob("*.png"))}


def run_dir(out: Path, label: str) -> Path:
    dirs = sorted(out.glob(f"smoke-tiny-{label}-*"))
    assert len(dirs) == 1, f"expected one {label} run folder under {out}, found {dirs}"
    return dirs[0]


def scores_bytes(out: Path, label: str = "base") -> bytes:
    return (run_dir(out, label) / "scores.parquet").read_bytes()


def manifest(out: Path, label: str = "base") -> dict:
    return json.loads((run_dir(out, label) / "manifest.json").read_text())


def decodes(path: Path, size: int = 32) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            return im.size == (size, size) and im.mode == "RGB"
    except Exception:
        return False


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def error_lines(err: str) -> list[str]:
    """stderr without log records (INFO/WARNING lines go to stderr too)."""
    return [line for line in err.strip().splitlines() if line.strip() and not re.match(r"^(DEBUG|INFO|WARNING) ", line)]


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    fh = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *args], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready, log: Path, what: str, timeout: float = 240.0):
    """Poll until ``ready()`` returns a truthy value, then SIGKILL the process; returns that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            assert proc.returncode == -signal.SIGKILL, f"{what}: process ended on its own ({proc.returncode})"
            return value
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}) before it could be killed:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    pytest.fail(f"{what}: not reached in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(cache_dir) -> Path:
    """Build the tiny model into the session cache (once); returns the cache."""
    assert bench_main("prefetch", "model=tiny", f"cache_dir={cache_dir}") == 0
    folder = Path(pipeline_location(to_dict(compose(["model=tiny"]))["model"], cache_dir)[0])
    assert folder.parent == cache_dir / "models" and folder.name.startswith("tiny-") and (folder / "model_index.json").is_file()
    return cache_dir


@pytest.fixture(scope="module")
def sft_run(built, tmp_path_factory) -> Path:
    """One `bench run suite=smoke method=sft ...` into the session cache; returns its out folder."""
    out = tmp_path_factory.mktemp("sft-runs")
    assert bench_main("run", *SFT_ARGS, f"cache_dir={built}", f"out={out}") == 0
    return out


# ---- 1. byte-identical scores --------------------------------------------------------------------
def test_identical_evals_give_identical_scores_bytes(cli, built, tmp_path):
    code, stdout, _ = cli("eval", *SMALL, f"out={tmp_path / 'a'}")
    assert code == 0 and "run folder:" in stdout
    code, _, _ = cli("eval", *SMALL, f"out={tmp_path / 'b'}")
    assert code == 0
    a, b = scores_bytes(tmp_path / "a"), scores_bytes(tmp_path / "b")
    assert len(a) > 1000 and a == b
    assert manifest(tmp_path / "b")["timings"]["generated"] == 0  # second run reused every image

    # A fresh cache (only the built model copied in) regenerates every image from scratch.
    fresh = fresh_cache(tmp_path / "fresh", built)
    code, _, _ = cli("eval", *SMALL, f"out={tmp_path / 'c'}", cache=fresh)
    assert code == 0
    t = manifest(tmp_path / "c")["timings"]
    assert (t["generated"], t["cached"]) == (8, 0)
    assert scores_bytes(tmp_path / "c") == a
    assert pngs(fresh) == {k: v for k, v in pngs(built).items() if k in pngs(fresh)} and len(pngs(fresh)) == 8


# ---- 2. batch-size invariance --------------------------------------------------------------------
def test_batch_size_does_not_change_any_image(cli, built, tmp_path):
    caches = {}
    for bs in (1, 8):
        caches[bs] = fresh_cache(tmp_path / f"cache-bs{bs}", built)
        code, _, _ = cli("eval", *SMALL, f"gen.batch_size={bs}", f"out={tmp_path / f'bs{bs}'}", cache=caches[bs])
        assert code == 0
        assert manifest(tmp_path / f"bs{bs}")["timings"]["generated"] == 8
    one, eight = pngs(caches[1]), pngs(caches[8])
    assert len(one) == 8 and set(one) == set(eight)
    differing = [k for k in one if one[k] != eight[k]]
    assert not differing, f"{len(differing)} of 8 images differ between gen.batch_size=1 and 8"
    assert scores_bytes(tmp_path / "bs1") == scores_bytes(tmp_path / "bs8")


# ---- 2a. a local folder in place of a hub id ------------------------------------------------------
def test_local_pipeline_folder_loads_like_a_hub_id(cli, built, tmp_path):
    """`model.source=DIR` goes through the same from_pretrained path and gives the same images."""
    folder = Path(pipeline_location(to_dict(compose(["model=tiny"]))["model"], built)[0])
    assert cli("eval", *SMALL, f"out={tmp_path / 'built'}")[0] == 0
    assert cli("eval", *SMALL, f"model.source={folder}", f"out={tmp_path / 'folder'}")[0] == 0
    a = pd.read_parquet(run_dir(tmp_path / "built", "base") / "scores.parquet")
    b = pd.read_parquet(run_dir(tmp_path / "folder", "base") / "scores.parquet")
    assert manifest(tmp_path / "folder")["identity"]["model"] == {"source": str(folder), "revision": None}
    assert set(a.image_key).isdisjoint(b.image_key)  # another identity, so other store keys ...
    pd.testing.assert_frame_equal(a.drop(columns="image_key"), b.drop(columns="image_key"))  # ... same pixels


# ---- 2b. process-count invariance ------------------------------------------------------------------
@pytest.mark.slow  # two bench processes, each loading torch: about 40 s
def test_two_worker_processes_fill_the_store_with_the_same_images(cli, built, tmp_path):
    """Two concurrent `bench eval gen.shard=i/2` workers make exactly the images one process makes."""
    cache = fresh_cache(tmp_path / "cache", built)
    workers = [spawn(["eval", *SMALL, f"gen.shard={i}/2", f"cache_dir={cache}"], tmp_path / f"w{i}.log") for i in range(2)]
    for i, proc in enumerate(workers):
        assert proc.wait(240) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
        assert "generated 4, already stored 0, of 8 images" in (tmp_path / f"w{i}.log").read_text()
    code, _, _ = cli("eval", *SMALL, f"out={tmp_path / 'sharded'}", cache=cache)
    assert code == 0
    assert manifest(tmp_path / "sharded")["timings"]["generated"] == 0
    single = fresh_cache(tmp_path / "single", built)
    assert cli("eval", *SMALL, f"out={tmp_path / 'one'}", cache=single)[0] == 0
    assert pngs(cache) == pngs(single) and len(pngs(cache)) == 8
    assert scores_bytes(tmp_path / "sharded") == scores_bytes(tmp_path / "one")
    code, _, err = cli("eval", *SMALL, "gen.shard=2/2")
    assert code == 2 and "gen.shard=2/2: not allowed" in err


# ---- 3. bench run end to end, then a cached re-run ------------------------------------------------
def test_run_sft_end_to_end_and_cached_rerun(cli, built, sft_run, caplog):
    base_dir, tuned_dir = run_dir(sft_run, "base"), run_dir(sft_run, "sft")
    prompts = EVAL_PROMPTS[:4]

    m = json.loads((tuned_dir / "manifest.json").read_text())
    assert m["config_hash"] == stable_hash(m["identity"]) and tuned_dir.name.endswith(m["config_hash"][:8])
    assert m["prompts_sha256"] == hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()
    assert m["n_prompts"] == 4 and m["method"] == "sft" and m["baseline"] == base_dir.name
    assert m["versions"]["torch"] == version("torch") and m["versions"]["pandas"] == version("pandas")
    assert "git_revision" in m
    assert m["seeds"]["base_seed"] == 0
    assert m["device"] == "cpu" and m["dtype"] == "float64"
    ckpt = Path(m["checkpoint"]["path"])
    assert ckpt.name == "final" and ckpt.parent.parent == built / "checkpoints"
    assert ckpt.parent.name == f"sft-{m['checkpoint']['train_id']}"

    scores = pd.read_parquet(tuned_dir / "scores.parquet")
    assert list(scores.columns) == ID_COLUMNS + METRICS
    assert len(scores) == 8
    assert scores["prompt_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert scores["image_index"].tolist() == [0, 1] * 4
    assert scores["prompt"].tolist() == [p for p in prompts for _ in range(2)]
    assert scores["seed"].tolist() == [image_seed("smoke", p, i, 0) for p in range(4) for i in range(2)]
    assert scores["image_key"].str.fullmatch(r"[0-9a-f]{40}").all() and scores["image_key"].nunique() == 8
    for name in METRICS:
        assert scores[name].dtype == "float64" and scores[name].map(math.isfinite).all()
    base_scores = pd.read_parquet(base_dir / "scores.parquet")
    assert set(base_scores["image_key"]).isdisjoint(scores["image_key"])  # the checkpoint is part of every key
    assert not base_scores[METRICS].equals(scores[METRICS])  # training moved the model

    summary = json.loads((tuned_dir / "summary.json").read_text())
    assert summary["n_images"] == 8 and summary["n_prompts"] == 4
    for name in METRICS:
        s = summary["metrics"][name]
        assert s["mean"] == pytest.approx(scores[name].mean(), rel=1e-12, abs=1e-12)
        assert s["ci"][0] <= s["mean"] <= s["ci"][1]
        w = summary["winrate"][name]
        assert 0.0 <= w["value"] <= 1.0 and w["ci"][0] <= w["value"] <= w["ci"][1]
        assert w["n_prompts"] == 4 and w["baseline"] == base_dir.name
    table = (tuned_dir / "table.md").read_text()
    assert table.startswith(f"# smoke / tiny / sft vs {base_dir.name}\n")
    assert all(f"| {name}" in table for name in METRICS)

    train = json.loads((ckpt / "train.json").read_text())
    assert train["steps"] == 12 and len(train["history"]) == 12 and all(map(math.isfinite, train["history"]))
    log = [json.loads(line) for line in (ckpt.parent / "train.jsonl").read_text().splitlines()]  # the report's training curves
    assert m["checkpoint"]["train_log"] == str(ckpt.parent / "train.jsonl")
    assert [r["step"] for r in log] == list(range(1, 13)) and [r["loss"] for r in log] == train["history"]
    assert (base_dir / "report.html").is_file() and 'data-kind="training"' in (tuned_dir / "report.html").read_text()
    assert (ckpt / "weights.safetensors").is_file()
    assert not list(ckpt.parent.glob("step-*"))  # intermediate checkpoints are cleaned up

    # The same command again: nothing is trained or generated, and the bytes are the same.
    before = {p: p.read_bytes() for p in (base_dir / "scores.parquet", tuned_dir / "scores.parquet", base_dir / "report.html", tuned_dir / "report.html")}
    ckpt_files = snapshot(ckpt.parent)
    caplog.set_level(logging.INFO)
    code, stdout, _ = cli("run", *SFT_ARGS, f"out={sft_run}")
    assert code == 0 and f"run folder: {tuned_dir}" in stdout
    assert f"reusing trained checkpoint {ckpt}" in caplog.text
    assert "resuming training" not in caplog.text
    assert snapshot(ckpt.parent) == ckpt_files
    for path, data in before.items():
        assert path.read_bytes() == data
    assert manifest(sft_run, "base")["timings"]["generated"] == 0
    assert manifest(sft_run, "sft")["timings"]["generated"] == 0


# ---- 4. SIGKILL during generation ---------------------------------------------------------------
@pytest.mark.slow  # fault injection (about 20 s), with tests/test_faults.py's
def test_sigkill_during_generation_resumes_to_identical_scores(cli, built, tmp_path):
    limit, total = 8, 16
    args = ["suite=smoke", f"suite.limit={limit}", "gen.batch_size=2"]
    killed = fresh_cache(tmp_path / "killed", built)
    log = tmp_path / "eval.log"
    proc = spawn(["eval", *args, f"cache_dir={killed}", f"out={tmp_path / 'runs-killed'}"], log)
    kill_when(proc, lambda: 2 <= len(list((killed / "images").rglob("*.png"))) < total - 2, log, "kill during generation")

    present = sorted((killed / "images").rglob("*.png"))
    assert 2 <= len(present) < total
    assert all(decodes(p) for p in present), "a file visible as .png does not decode after the kill"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in present}
    assert not (tmp_path / "runs-killed").exists() or not list((tmp_path / "runs-killed").rglob("scores.parquet"))

    code, _, _ = cli("eval", *args, f"out={tmp_path / 'runs-killed'}", cache=killed)
    assert code == 0
    t = manifest(tmp_path / "runs-killed")["timings"]
    assert (t["cached"], t["generated"]) == (len(present), total - len(present))
    for p, (mtime, data) in before.items():
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    assert len(pngs(killed)) == total

    code, _, _ = cli("eval", *args, f"out={tmp_path / 'runs-clean'}")  # uninterrupted, session cache
    assert code == 0
    assert scores_bytes(tmp_path / "runs-killed") == scores_bytes(tmp_path / "runs-clean")
    assert pngs(killed) == {k: v for k, v in pngs(built).items() if k in pngs(killed)}


# ---- 5. SIGKILL during training -----------------------------------------------------------------
@pytest.mark.slow  # a killed and a restarted training process: about 35 s
def test_sigkill_during_training_resumes_to_identical_weights(cli, built, sft_run, tmp_path, caplog):
    steps = 30
    args = ["method=sft", f"train.steps={steps}", "train.save_every=5", "method.samples_per_prompt=2"]

    clean = fresh_cache(tmp_path / "clean", built, data=True)
    code, stdout, _ = cli("train", *args, cache=clean)
    assert code == 0
    clean_final = Path(stdout.split("checkpoint: ", 1)[1].split()[0])
    assert clean_final.is_dir() and clean_final.parent.parent == clean / "checkpoints"

    killed = fresh_cache(tmp_path / "killed", built, data=True)
    log = tmp_path / "train.log"
    proc = spawn(["train", *args, f"cache_dir={killed}"], log)

    def step_dirs():
        return sorted(p.name for p in (killed / "checkpoints").glob("sft-*/step-*"))

    kill_when(proc, step_dirs, log, "kill during training", timeout=300)
    root = killed / "checkpoints" / clean_final.parent.name  # same train id in both caches
    assert root.is_dir() and not (root / "final").exists(), "training finished before the kill"
    saved = sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "state.json").exists())
    assert saved and 0 < saved[-1] < steps

    caplog.set_level(logging.INFO)
    code, stdout, _ = cli("train", *args, cache=killed)
    assert code == 0 and f"checkpoint: {root / 'final'}" in stdout
    assert re.search(rf"resuming training from \S+step-{saved[-1]:07d} \(step {saved[-1]}\)", caplog.text)

    a, b = load_file(root / "final" / "weights.safetensors"), load_file(clean_final / "weights.safetensors")
    assert a and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    ha = json.loads((root / "final" / "train.json").read_text())["history"]
    hb = json.loads((clean_final / "train.json").read_text())["history"]
    assert len(ha) == len(hb) == steps
    assert ha[: saved[-1]] == hb[: saved[-1]] and ha == hb
    log = (root / "train.jsonl").read_bytes()  # cut back to the resumed step, then continued: no step twice
    assert log == (clean_final.parent / "train.jsonl").read_bytes() and [json.loads(x)["step"] for x in log.splitlines()] == list(range(1, steps + 1))


# ---- 6. corrupt cached images --------------------------------------------------------------------
def test_corrupt_cached_images_are_regenerated(cli, built, tmp_path):
    code, _, _ = cli("eval", *SMALL, f"out={tmp_path / 'orig'}")
    assert code == 0
    cache = fresh_cache(tmp_path / "cache", built, images=True)
    keys = pd.read_parquet(run_dir(tmp_path / "orig", "base") / "scores.parquet")["image_key"].tolist()
    paths = [cache / "images" / k[:2] / f"{k}.png" for k in keys]
    original = {p: p.read_bytes() for p in paths}
    truncated, garbage = paths[1], paths[6]
    truncated.write_bytes(original[truncated][: len(original[truncated]) // 2])
    garbage.write_bytes(b"this is not a png" * 20)
    assert not decodes(truncated) and not decodes(garbage)

    code, _, _ = cli("eval", *SMALL, f"out={tmp_path / 'again'}", cache=cache)
    assert code == 0
    t = manifest(tmp_path / "again")["timings"]
    assert (t["generated"], t["cached"]) == (2, 6)
    assert {p: p.read_bytes() for p in paths} == original
    assert scores_bytes(tmp_path / "again") == scores_bytes(tmp_path / "orig")


# ---- 7. one-line errors ------------------------------------------------------------------------
def _one_error_line(err: str) -> str:
    lines = error_lines(err)
    assert len(lines) == 1, f"expected one error line, got {lines}"
    assert lines[0].startswith("bench: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "args, code, needles",
    [
        (["run", "method=sfx"], 2, ["unknown method 'sfx'", "did you mean sft"]),
        (["eval", "suite=mirco"], 2, ["unknown suite 'mirco'", "did you mean micro"]),
        (["eval", "model=tinyy"], 2, ["unknown model 'tinyy'", "did you mean tiny"]),
        (["eval", "train.stpes=5"], 2, ["unknown config key 'train.stpes'", "did you mean train.steps"]),
        (["eval", "garbage"], 2, ["malformed override 'garbage'", "key=value"]),
        (["eval", "suite.source=/nonexistent.txt"], 3, ["prompt file not found: /nonexistent.txt"]),
        (["run", "suite=smoke", "method=sft", "method.reward=sharpness"], 2, ["unknown metric 'sharpness'", "did you mean brightness"]),
        (["run", "suite=smoke", "method=sft", "suite.reward=null"], 2, ["method 'sft' needs a reward", "method.reward=NAME"]),
        (["eval", "gen.dtype=float8"], 2, ["gen.dtype=float8: not allowed", "float16"]),
    ],
    ids=["method", "suite", "model", "key", "override", "prompt-file", "reward", "no-reward", "dtype"],
)
def test_usage_errors_are_one_line(cli, args, code, needles):
    got, out, err = cli(*args)
    assert got == code
    line = _one_error_line(err)
    for needle in needles:
        assert needle in line
    assert "Traceback" not in err + out


@pytest.mark.parametrize(
    "name, content, needle",
    [("prompts.json", '["a red apple", "a boat"', "invalid JSON"), ("prompts.csv", "id,description\n1,a red apple\n", "no column named prompt")],
    ids=["json", "csv"],
)
def test_malformed_prompt_files_are_one_line(cli, tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_text(content)
    code, _, err = cli("eval", "suite=smoke", f"suite.source={path}")
    assert code == 3
    line = _one_error_line(err)
    assert f"malformed prompt file {path}" in line and needle in line


def test_nan_loss_stops_with_exit_4_and_keeps_checkpoints(cli, built, sft_run):
    code, _, err = cli("train", "suite=smoke", "method=sft", "train.lr=1e30", "train.steps=4", "train.save_every=100", "method.samples_per_prompt=2")
    assert code == 4
    line = _one_error_line(err)
    assert "nan" in line.lower() and "train.lr" in line
    kept = Path(re.search(r"kept in (\S+?):", line).group(1))
    assert kept.parent == built / "checkpoints" and kept.name.startswith("sft-")
    assert [p.name for p in kept.glob("step-*")] and not (kept / "final").exists()


def test_missing_weights_offline_exit_5(cli, tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    code, _, err = cli("eval", "model=sd15", "suite.limit=1", cache=tmp_path / "empty-cache")
    assert code == 5
    line = _one_error_line(err)
    assert "sd15" in line and "`bench prefetch model=sd15`" in line


# ---- 8. ls, leaderboard, check -----------------------------------------------------------------
def test_ls_methods_lists_sft_with_description(cli):
    code, out, _ = cli("ls", "methods")
    assert code == 0
    description = next(
        line.split(":", 1)[1].strip() for line in (REPO / "methods" / "sft.yaml").read_text().splitlines() if line.startswith("description:")
    )
    assert re.search(rf"^  sft\s+{re.escape(description)}$", out, re.M)


def test_leaderboard_and_check(cli, sft_run, tmp_path):
    runs = sorted(p.parent.name for p in sft_run.rglob("summary.json"))
    assert len(runs) == 2
    code, out, _ = cli("leaderboard", f"out={sft_run}")
    assert code == 0
    md = (sft_run / "leaderboard.md").read_text()
    rows = list(csv.DictReader(io.StringIO((sft_run / "leaderboard.csv").read_text())))
    assert sorted(r["run_id"] for r in rows) == runs
    assert {r["method"] for r in rows} == {"base", "sft"}
    assert all(run in md for run in runs) and md.count("\n| smoke") == 2
    tuned = run_dir(sft_run, "sft")
    summary = json.loads((tuned / "summary.json").read_text())
    sft_row = next(r for r in rows if r["method"] == "sft")
    assert float(sft_row["brightness"]) == pytest.approx(summary["metrics"]["brightness"]["mean"], rel=1e-12)

    mean = summary["metrics"]["brightness"]["mean"]
    win = summary["winrate"]["contrast"]["value"]
    good = tmp_path / "gate.json"
    good.write_text(
        json.dumps(
            {
                "metrics.brightness.mean": {"value": mean, "abs_tol": 1e-6},
                "winrate.contrast.value": {"value": win, "abs_tol": 1e-6},
                "n_images": {"min": 8, "max": 8},
            }
        )
    )
    code, out, err = cli("check", f"run={tuned}", f"baseline={good}")
    assert code == 0, err
    assert "all 3 checks within tolerance" in out

    bad = tmp_path / "gate-bad.json"
    bad.write_text(json.dumps({"metrics.brightness.mean": {"min": mean + 0.01}}))
    code, out, err = cli("check", f"run={tuned}", f"baseline={bad}")
    assert code != 0
    assert _one_error_line(err) == "bench: error: 1 of 1 checks outside tolerance: metrics.brightness.mean"
    assert "FAIL" in out
