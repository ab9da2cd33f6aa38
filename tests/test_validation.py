"""The typed config schema (``bench.schema``): every bad value is refused at composition in one line
naming the key, the value and the fix, exit 2, before any model is built or run folder written;
every registered preset composes; the schema feeds ``bench <command> --help``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import bench.models
import bench.runner
from bench.config import compose, to_dict
from bench.errors import DataError, UsageError
from bench.metrics import Metric, MetricInfo
from bench.registry import METHODS, METRICS, SUITES, Entry
from bench.schema import SAMPLER_KINDS, keys
from bench.suite import load_suite

PICKAPIC = "pickapic/test_unique_500/pickscore_eval_500.jsonl"  # under the real data folder or tests/data/mini


@pytest.fixture(autouse=True)
def no_model_builds(monkeypatch):
    """Validation happens before any model is built: building one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(bench.models, "load_model", refuse)
    monkeypatch.setattr(bench.runner, "load_model", refuse)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("bench: error: ") and "Traceback" not in err
    return lines[0]


BAD = [  # (command line, what the one line must say)
    ("eval gen.batch_size=abc", ["gen.batch_size=abc", "not an integer", "use an integer >= 1"]),
    ("eval gen.batch_size=0", ["gen.batch_size=0", "out of range", "use an integer >= 1"]),
    ("train method=sft train.batch_size=-4", ["train.batch_size=-4", "use an integer >= 1"]),
    ("eval gen.steps=0", ["gen.steps=0", "use an integer >= 1, or null"]),
    ("eval gen.guidance=-1", ["gen.guidance=-1", "use a number >= 0"]),
    ("eval gen.dtype=float8", ["gen.dtype=float8", "use one of auto, float64, float32, float16, bfloat16"]),
    ("eval device=gpu", ["device=gpu", "use auto, cpu, cuda, cuda:N or mps"]),
    ("eval seed=1.5", ["seed=1.5", "not an integer", "use an integer >= 0"]),
    ("eval seed=abc", ["seed=abc", "not an integer"]),
    ("run method=sft seed=-1", ["seed=-1", "use an integer >= 0"]),
    ("eval suite.limit=0", ["suite.limit=0", "use an integer >= 1, or null"]),
    ("eval suite.limit=-2", ["suite.limit=-2", "use an integer >= 1, or null"]),
    ("eval suite.images_per_prompt=0", ["suite.images_per_prompt=0", "use an integer >= 1"]),
    ("eval gen.batchsize=8", ["unknown config key 'gen.batchsize'", "gen.batchsize=8", "did you mean gen.batch_size"]),
    ("train method=sft train.lr=0", ["train.lr=0", "use a number > 0"]),
    ("train method=sft train.lr=-1e-4", ["train.lr=-0.0001", "use a number > 0"]),
    ("train method=sft train.steps=0", ["train.steps=0", "use an integer >= 1"]),
    ("train method=sft train.grad_accum=0", ["train.grad_accum=0", "use an integer >= 1"]),
    ("train method=sft train.mixed_precision=fp32", ["train.mixed_precision=fp32", "use one of auto, no, fp16, bf16"]),
    ("train method=sft train.optimizer=sgd", ["train.optimizer=sgd", "use one of adamw, adafactor, adamw8bit"]),
    ("train method=sft train.lr_schedule=step", ["train.lr_schedule=step", "use one of constant, constant_with_warmup, linear, cosine"]),
    ("train method=sft train.micro_batch_size=3", ["train.micro_batch_size=3", "train.batch_size=8 is not a multiple", "use a divisor of 8"]),
    ("train method=sft train.ema_decay=1.5", ["train.ema_decay=1.5", "use a number in (0, 1), or null"]),
    ("run method=sft train.adam_betas=[0.9]", ["train.adam_betas=[0.9]", "use two numbers in [0, 1)"]),
    ("run method=sft train.full_finetune=maybe", ["train.full_finetune=maybe", "use true or false"]),
    ("eval stats.level=1.5", ["stats.level=1.5", "use a number in (0, 1)"]),
    ("eval stats.level=0", ["stats.level=0", "use a number in (0, 1)"]),
    ("eval stats.n_boot=0", ["stats.n_boot=0", "use an integer >= 1"]),
    ("eval score.batch_size=0", ["score.batch_size=0", "use an integer >= 1"]),
    ("eval scorers=fake", ["scorers=fake", "use one of official, tiny"]),
    ("eval gen.shard=4/2", ["gen.shard=4/2", '"i/N" with 0 <= i < N']),
    ("eval suite.metrics=[]", ["suite.metrics=[]", "at least one metric name"]),
    ("eval suite.metrics=[brightnes]", ["suite.metrics=[brightnes]", "unknown metric 'brightnes'", "did you mean brightness"]),
    ("run method=sft method.reward=sharpness", ["method.reward=sharpness", "unknown metric 'sharpness'", "did you mean brightness"]),
    ("eval model.sampler.kind=dpm", ["model.sampler.kind=dpm", "use one of ddim, euler"]),
    ("plan method=sft train.steps=-5", ["train.steps=-5", "use an integer >= 1"]),
    ("eval gen=5", ["gen=5", "gen is a group of keys", "set gen.KEY=VALUE"]),
    ("run method=sft train.sampler=[1]", ["train.sampler=[1]", "not a mapping"]),
    ("run method=sft train.adam_betas={a:1}", ["train.adam_betas={a:1}", "write one of the same shape"]),
    ("eval method.seed=3", ["method.seed=3", "no method is chosen", "add method=NAME"]),
]


@pytest.mark.parametrize("line, needles", BAD, ids=[line for line, _ in BAD])
def test_bad_values_are_one_line_and_exit_2_before_any_work(cli, tmp_path, line, needles):
    out_dir = tmp_path / "out"
    code, out, err = cli(*line.split(), f"out={out_dir}")
    assert code == 2
    message = one_line(err)
    for needle in needles:
        assert needle in message
    assert not out_dir.exists()


@pytest.fixture
def register(monkeypatch, tmp_path):
    """Register a preset from YAML text for one test: register(SUITES, "name", "text")."""

    def add(registry, name: str, text: str):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        registry._load_plugins()
        monkeypatch.setitem(registry._entries, name, Entry(name, path, "test"))

    return add


def test_a_suite_without_metrics_is_refused_at_composition(cli, register, tmp_path):
    register(SUITES, "nometrics", "prompts: p.txt\nimages_per_prompt: 1\n")
    code, _, err = cli("eval", "suite=nometrics", f"out={tmp_path / 'out'}")
    assert code == 2
    message = one_line(err)
    assert "suite.metrics=null (in suite 'nometrics'): missing" in message and "at least one metric name" in message
    assert not (tmp_path / "out").exists()


def test_a_preset_with_a_bad_value_is_named(register):
    register(METHODS, "sft-bad", "extends: sft\ntrain:\n  lr: -1\n")
    with pytest.raises(UsageError, match=r"^train\.lr=-1 \(set by method 'sft-bad'\): out of range; use a number > 0"):
        compose(["method=sft-bad"])
    register(METHODS, "sft-typo", "extends: sft\ntrain:\n  stpes: 3\n")
    with pytest.raises(UsageError, match=r"unknown config key 'train\.stpes' \(set by method 'sft-typo'\); did you mean train\.steps"):
        compose(["method=sft-typo"])


def test_limit_now_means_the_first_n_prompts():
    assert to_dict(compose(["suite=smoke", "suite.limit=3"]))["suite"]["limit"] == 3
    assert len(load_suite(to_dict(compose(["suite=smoke", "suite.limit=3"]))["suite"]).prompts) == 3


# ---- empty prompts -----------------------------------------------------------------------------
def test_a_blank_line_in_a_prompt_file_is_refused_unless_the_suite_allows_it(cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\na boat\n   \nthe sea\n")
    code, _, err = cli("eval", "suite=smoke", f"suite.source={prompts}", f"out={tmp_path / 'out'}")
    assert code == 3
    message = one_line(err)
    assert f"{prompts} has 2 empty prompts (lines 2, 4)" in message and "suite.allow_empty_prompts=true" in message
    assert not (tmp_path / "out").exists()
    kept = load_suite(to_dict(compose(["suite=smoke", f"suite.source={prompts}", "suite.allow_empty_prompts=true"]))["suite"])
    assert kept.prompts == ["a red apple", "", "a boat", "   ", "the sea"]
    assert load_suite(to_dict(compose(["suite=smoke", f"suite.source={prompts}", "suite.limit=1"]))["suite"]).prompts == ["a red apple"]  # only the prompts evaluated


@pytest.mark.parametrize("real", [False, True], ids=["stand-in", "real"])
def test_pickapic_declares_its_empty_prompt_and_other_suites_refuse_it(real, request, mini_data):
    data = request.getfixturevalue("shared_data") if real else mini_data
    source = data / PICKAPIC
    assert to_dict(compose(["suite=pickapic"]))["suite"]["allow_empty_prompts"] is True
    prompts = load_suite(to_dict(compose(["suite=pickapic", f"suite.source={source}"]))["suite"]).prompts
    empty = [i for i, p in enumerate(prompts) if p == ""]
    assert empty == ([87] if real else [2]) and len(prompts) == (500 if real else 4)
    with pytest.raises(DataError, match=rf"has 1 empty prompt \(row {empty[0] + 1}\)"):
        load_suite(to_dict(compose(["suite=smoke", f"suite.source={source}"]))["suite"])


# ---- bench score -------------------------------------------------------------------------------
class PixelMean(Metric):
    """Reads only the pixels."""

    info = MetricInfo("pixel-mean", "1", True, "mean pixel in [0, 1]")
    needs_prompts = False

    def score(self, images, prompts, refs=None):
        return images.double().mean(dim=(1, 2, 3))


class PromptLength(Metric):
    """Reads the prompt (``Metric.needs_prompts`` is True unless a metric says otherwise)."""

    info = MetricInfo("prompt-length", "1", True, "characters")

    def score(self, images, prompts, refs=None):
        return torch.tensor([float(len(p)) for p in prompts], dtype=torch.float64)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    METRICS._load_plugins()
    monkeypatch.setitem(METRICS._entries, "pixel-mean", Entry("pixel-mean", PixelMean))
    monkeypatch.setitem(METRICS._entries, "prompt-length", Entry("prompt-length", PromptLength))
    images = tmp_path / "images"
    images.mkdir()
    for i, value in enumerate((0, 255)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(images / f"{i}.png")
    return images


def test_score_without_prompts_runs_prompt_free_metrics(cli, folder):
    code, out, err = cli("score", f"images={folder}", "metrics=pixel-mean")
    assert code == 0, err
    assert "| pixel-mean" in out and "0.5" in out


def test_the_pixel_metrics_score_a_folder_without_prompts(cli, folder):
    code, out, err = cli("score", f"images={folder}", "metrics=brightness,contrast,colorfulness,jpeg_compressibility,aesthetic", "scorers=tiny")
    assert code == 0, err
    assert "| brightness" in out and "| aesthetic" in out
    code, _, err = cli("score", f"images={folder}", "metrics=brightness,pickscore", "scorers=tiny")
    assert code == 2 and "read by pickscore" in one_line(err)


def test_score_without_prompts_names_the_metrics_that_read_them(cli, folder):
    code, out, err = cli("score", f"images={folder}", "metrics=pixel-mean,prompt-length")
    assert code == 2 and out == ""
    message = one_line(err)
    assert "prompts= is missing" in message and "read by prompt-length" in message and "pass prompts=FILE" in message


@pytest.mark.parametrize("arg, needle", [("batch_size=0", "batch_size=0: out of range"), ("device=gpu", "device=gpu: not allowed"),
                                         ("scorers=fake", "scorers=fake: not allowed"), ("batch_size=abc", "batch_size=abc: not an integer")])
def test_score_checks_its_settings_with_the_same_rules(cli, folder, arg, needle):
    code, _, err = cli("score", f"images={folder}", "metrics=pixel-mean", arg)
    assert code == 2 and needle in one_line(err)


# ---- --help and the registered presets ---------------------------------------------------------
def test_help_lists_every_key_with_type_default_and_comment(cli):
    code, out, _ = cli("run", "--help")
    assert code == 0 and out.startswith("usage: bench run")
    for key, _ in keys():
        assert f"  {key} " in out
    line = next(l for l in out.splitlines() if l.strip().startswith("gen.batch_size "))
    assert line.split()[1:5] == ["int", ">=", "1", "8"] and line.endswith("does not change any image")
    assert "suite.limit" in out and "suite.allow_empty_prompts" in out
    code, out, _ = cli("help", "score")
    assert code == 0 and "prompts=FILE" in out and "gen.batch_size" not in out


def test_the_schema_knows_every_sampler_kind():
    from bench.models.diffusion import SAMPLER_KINDS as KINDS
    from bench.models.flow import FLOW_KINDS

    assert SAMPLER_KINDS == KINDS + FLOW_KINDS
