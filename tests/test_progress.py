"""Progress and output for people and for scripts: lines in a batch log, -q, -v and --json."""

from __future__ import annotations

import json
import re

import pytest

EVAL = ["eval", "suite=smoke", "suite.limit=2", "model=tiny", "stats.n_boot=50", "stats.n_permutations=50"]


@pytest.fixture
def every_update(monkeypatch):
    """A progress line at every update (a batch job gets one every 30 s; these runs take less)."""
    monkeypatch.setenv("BENCH_PROGRESS_EVERY", "0")


def test_a_piped_run_prints_progress_lines(cli, every_update):
    code, out, err = cli(*EVAL, "gen.batch_size=1", "seed=9173")  # images no other test made: all four are generated here
    assert code == 0
    lines = err.splitlines()
    generate = [line for line in lines if re.match(r"generate tiny: +\d+%\|.*\| \d/4 ", line)]
    assert generate and generate[-1].startswith("generate tiny: 100%"), err  # whole lines, not carriage-return redraws
    assert any(re.match(r"score: +\d+%\|", line) for line in lines)
    assert "\r" not in err and "run folder:" in out


def test_quiet_prints_no_progress_and_no_info(cli, every_update, caplog):
    code, out, err = cli(*EVAL, "-q")
    assert code == 0 and "%|" not in err
    assert "run folder:" in out


def test_json_prints_the_summary_for_scripts(cli):
    code, out, err = cli(*EVAL, "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"run_dir", "summary"}
    assert 0 <= result["summary"]["metrics"]["brightness"]["mean"] <= 1
    assert (json.loads(open(f"{result['run_dir']}/summary.json").read()) == result["summary"])


def test_a_batch_log_stays_quiet_for_short_work(cli):
    """Without the override, work shorter than 30 s leaves no progress line in a log."""
    code, out, err = cli(*EVAL)
    assert code == 0 and "%|" not in err
