"""Data-parallel work under torchrun on 2 CPU processes: an evaluation leaves the run folder one process
leaves (scores.parquet to the byte, FID and KID to the last bit), training with the same global batch
ends at the weights one process trains (each rank computes its share of a step's micro-batches, the
gradients are summed), an online method's rounds are sampled a share per rank; a rank killed mid-run
stops the others with one line, and the same command run again resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.ranks import Ranks
from conftest import synth_mjhq

REPO = Path(__file__).resolve().parents[1]


def test_each_rank_takes_every_nth_batch_and_together_they_take_each_item_once():
    items = list(range(11))
    shares = [Ranks(r, 3).share(items, 2) for r in range(3)]
    assert shares == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10]]  # batches [0,1] [2,3] [4,5] [6,7] [8,9] [10]
    assert sorted(sum(shares, [])) == items and Ranks().share(items, 4) == items
    assert Ranks(3, 4).share(items[:4], 2) == []  # more ranks than batches: a rank with nothing to do


def mjhq(root: Path) -> list[str]:
    """A 5-prompt MJHQ-30K stand-in (meta_data.json and one reference photo per prompt) as overrides."""
    meta, refs = synth_mjhq(root)
    # 5 images in batches of 2: rank 0 makes and scores batches 0 and 2, rank 1 batch 1
    return ["suite=mjhq30k", "model=tiny", f"suite.source={meta}", f"suite.references={refs}", "scorers=tiny", "gen.steps=2",
            "gen.batch_size=2", "score.batch_size=2", "report.html=false"]


def torchrun(args: list[str], log: Path, nproc: int = 2) -> subprocess.Popen:
    """``bench ARGS`` under torchrun with ``nproc`` processes (0: plain ``python -m bench``), one thread
    each: float32 scorers sum in another order on another thread count."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("BENCH_HOME", None)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    cmd = [sys.executable, *launcher, "-m", "bench", *args]
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def linked_cache(root: Path, session_cache: str) -> Path:
    """An empty cache sharing the session's built models (a run's own images and scores start empty)."""
    root.mkdir(parents=True)
    models = Path(session_cache) / "models"
    models.mkdir(exist_ok=True)
    (root / "models").symlink_to(models.resolve())
    return root


def in_one_thread(cli, *args, **kw):
    """``cli`` with torch on one thread, as each launched rank runs (the pytest workers do already)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli(*args, **kw)
    finally:
        torch.set_num_threads(threads)


def final_weights(cache: Path) -> dict:
    from safetensors.torch import load_file

    (path,) = cache.glob("checkpoints/*/final/weights.safetensors")
    return load_file(path)


def train_ranks_and_one(cli, cache_dir, tmp_path, args: list[str]) -> tuple[dict, dict, Path]:
    """The final weights of ``bench train ARGS`` in one process and on 2 ranks (caches of their own)."""
    one, two = linked_cache(tmp_path / "cache-one", cache_dir), linked_cache(tmp_path / "cache-two", cache_dir)
    code, _, err = in_one_thread(cli, "train", *args, cache=one)
    assert code == 0, err
    proc = torchrun(["train", *args, f"cache_dir={two}"], tmp_path / "two.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "two.log").read_text()[-3000:]
    return final_weights(one), final_weights(two), two


def only_run(out: Path) -> Path:
    (run,) = [d for d in out.iterdir() if d.is_dir()]
    return run


def test_two_ranks_leave_the_run_folders_and_checkpoint_of_one_process(cli, cache_dir, tmp_path):
    """`bench run` on the MJHQ stand-in: generation, per-image scores and FID/KID features split by batch,
    training split by micro-batch (2 a step: one per rank, their gradients summed)."""
    (tmp_path / "train.txt").write_text("a red fox\na bowl of soup\n")
    args = ["run", *mjhq(tmp_path), "method=sft", f"method.train_prompts={tmp_path / 'train.txt'}", "method.samples_per_prompt=2",
            "train.steps=2", "train.batch_size=1", "train.grad_accum=2", "train.save_every=1"]
    one = linked_cache(tmp_path / "cache-one", cache_dir)
    code, _, err = in_one_thread(cli, *args, f"out={tmp_path / 'one'}", cache=one)
    assert code == 0, err
    two = linked_cache(tmp_path / "cache-two", cache_dir)
    proc = torchrun([*args, f"out={tmp_path / 'two'}", f"cache_dir={two}"], tmp_path / "two.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "two.log").read_text()[-3000:]
    runs = {name: sorted(d for d in (tmp_path / name).iterdir() if d.is_dir()) for name in ("one", "two")}
    assert [d.name for d in runs["one"]] == [d.name for d in runs["two"]] and len(runs["one"]) == 2  # base and tuned, the same identities
    for a, b in zip(runs["one"], runs["two"]):
        assert (a / "scores.parquet").read_bytes() == (b / "scores.parquet").read_bytes()
        sets = [json.loads((d / "summary.json").read_text())["sets"] for d in (a, b)]
        for metric in ("fid", "kid"):
            x, y = sets[0][metric], sets[1][metric]
            assert x["n_images"] == y["n_images"] == 5 and x["value"] == pytest.approx(y["value"], rel=1e-9, abs=0)
            assert x["ci"] == pytest.approx(y["ci"], rel=1e-9)  # equal sums; the matrix square root may round apart on another BLAS thread count
            groups = [{g: v["value"] for g, v in m["by_group"]["category"].items()} for m in (x, y)]
            assert groups[0] == pytest.approx(groups[1], rel=1e-9) and len(groups[0]) == 3
        manifest = json.loads((b / "manifest.json").read_text())
        assert manifest["processes"] == 2 and manifest["timings"]["generated"] + manifest["timings"]["cached"] == 5
    weights = [final_weights(c) for c in (one, two)]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-5
    assert any((weights[0][k] != 0).any() for k in weights[0] if "lora_B" in k)  # it trained
    log = (tmp_path / "two.log").read_text()
    assert log.count("run folder:") == 1 and "bench: error" not in log  # rank 0 alone prints the table


@pytest.mark.slow  # about a minute: a launch killed mid-generation, then the full run (the default test above covers the split)
def test_a_killed_rank_stops_the_others_with_one_line_and_a_rerun_resumes(cache_dir, tmp_path):
    args = ["eval", "suite=smoke", "model=tiny", "suite.limit=16", "gen.batch_size=1", "report.html=false"]
    single = torchrun([*args, f"out={tmp_path / 'one'}", f"cache_dir={linked_cache(tmp_path / 'cache-one', cache_dir)}"], tmp_path / "one.log", nproc=0)
    assert single.wait(timeout=600) == 0, (tmp_path / "one.log").read_text()[-3000:]
    cache = linked_cache(tmp_path / "cache", cache_dir)
    run = [*args, f"out={tmp_path / 'two'}", f"cache_dir={cache}"]
    proc = torchrun(run, tmp_path / "killed.log")
    images = cache / "images"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(images.rglob("*.png"))) < 4:
        time.sleep(0.2)
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "bench"], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[-1]), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    lines = [line for line in (tmp_path / "killed.log").read_text().splitlines() if line.startswith("bench: error:")]
    assert len(lines) == 1 and "stopped by the launcher" in lines[0] and "run the same command again to resume" in lines[0], lines
    made = len(list(images.rglob("*.png")))
    assert 4 <= made < 32  # 16 prompts, 2 images each
    again = torchrun(run, tmp_path / "again.log")
    assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    manifest = json.loads((only_run(tmp_path / "two") / "manifest.json").read_text())
    assert manifest["timings"]["cached"] >= made - 1 and manifest["timings"]["generated"] + manifest["timings"]["cached"] == 32
    assert (only_run(tmp_path / "one") / "scores.parquet").read_bytes() == (only_run(tmp_path / "two") / "scores.parquet").read_bytes()


@pytest.mark.slow  # about a minute: bench perf's four measures (a fresh store each) on 4 prompts
def test_perf_measures_the_two_process_speed_up_with_identical_scores(cli):
    code, out, err = cli("perf", "suite.limit=4")
    assert code == 0, err
    rows = [line for line in out.splitlines() if "generation and scoring: 2 processes (torchrun) over 1 process" in line]
    assert len(rows) == 2 and "scores.parquet byte-identical in all three" in rows[1] and all(float(r.split("|")[2]) > 0 for r in rows)


@pytest.mark.slow  # about a minute: 20 steps twice (the default test trains 2), and an online method's shared rounds
def test_twenty_steps_and_an_online_method_on_two_ranks_equal_one_process(cli, cache_dir, tmp_path):
    args = ["suite=smoke", "method=sft", "model=tiny", "suite.limit=4", "method.samples_per_prompt=2", "train.steps=20", "train.batch_size=1",
            "train.grad_accum=4", "train.save_every=5"]
    one, two, _ = train_ranks_and_one(cli, cache_dir, tmp_path / "sft", args)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    online = ["suite=smoke", "method=pso-online", "model=tiny-fewstep", "suite.limit=4", "scorers=tiny", "train.steps=4", "train.batch_size=2",
              "train.grad_accum=2", "method.prompts_per_round=2", "train.save_every=2", "gen.batch_size=1"]  # 4 sampling chunks a round, 2 per rank
    one, two, cache = train_ranks_and_one(cli, cache_dir, tmp_path / "online", online)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert sorted(p.name for p in cache.glob("checkpoints/*/rounds/*")) == ["round-000002.safetensors", "round-000003.safetensors"]
