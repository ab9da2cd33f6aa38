"""The prompt suites through their own loaders: the real files (BENCH_TEST_DATA, default ../shared/data) for
their published counts and hashes, the stand-ins of tests/data/mini for every code path, end to end."""

import collections
import json

import pytest

from bench.config import compose, to_dict
from bench.errors import DataError
from bench.suite import load_suite
from conftest import published, stand_in

PARTI = "partiprompts/PartiPrompts.tsv"  # relative to the data folder: the real one or tests/data/mini
PICKAPIC = "pickapic/test_unique_500/pickscore_eval_500.jsonl"
DRAWBENCH = "drawbench/drawbench.jsonl"


def suite(name, *overrides):
    return load_suite(to_dict(compose([f"suite={name}", *overrides]))["suite"])


@pytest.fixture
def mini_parti(mini_data):
    """Overrides for the parti suite on the stand-in TSV, recorded as the published set."""
    return stand_in("parti", mini_data / PARTI)


# ---- the real files ------------------------------------------------------------------------------
def test_parti_from_the_tsv_has_its_published_counts_and_breakdowns(shared_data):
    s = suite("parti", f"suite.source={shared_data / PARTI}")
    assert len(s.prompts) == 1632 and s.canonical is True
    assert s.sha256 == "2abb98084b1d558d0cbcdd53b1b7231368ef097338244ee9f604c7198a42258d"
    categories = collections.Counter(s.groups["Category"])
    assert len(categories) == 12 and categories["Animals"] == 314 and categories["Indoor Scenes"] == 40
    challenges = collections.Counter(s.groups["Challenge"])
    assert len(challenges) == 11 and challenges["Fine-grained Detail"] == 312 and challenges["Properties & Positioning"] == 35
    assert s.metrics == ["pickscore", "hpsv2.1", "imagereward", "aesthetic", "clip-h14"] and s.images_per_prompt == 1


def test_pickapic_test_unique_keeps_its_empty_prompt(shared_data):
    s = suite("pickapic", f"suite.source={shared_data / PICKAPIC}")
    assert len(s.prompts) == 500 and s.canonical is True
    assert [i for i, p in enumerate(s.prompts) if not p.strip()] == [87]
    assert s.sha256 == "68e01e780b4534b994bad737ad8fc32d95e43dfc7e1923982a853c413f7114cb"


def test_drawbench_has_200_prompts_in_11_categories(shared_data):
    s = suite("drawbench", f"suite.source={shared_data / DRAWBENCH}")
    assert len(s.prompts) == 200 and s.canonical is True
    assert s.sha256 == "74f90299e28ed903f1e56053c64c8351a5092c4f601a1b4ff0ffd4ab21369154"
    categories = collections.Counter(s.groups["Category"])
    assert len(categories) == 11 and categories["Reddit"] == 38 and categories["Colors"] == 25


def test_a_different_prompt_list_is_flagged_as_not_the_published_set(shared_data, caplog):
    s = suite("drawbench", f"suite.source={shared_data / 'drawbench' / 'drawbench.txt'}")  # OpenAI's copy: 2 prompts differ
    assert len(s.prompts) == 200 and s.canonical is False and s.groups == {}
    assert "not the published prompt set" in caplog.text


def test_limit_takes_a_prefix_of_prompts_and_labels(shared_data):
    s = suite("parti", f"suite.source={shared_data / PARTI}", "suite.limit=4")
    assert s.prompts == ["bond", "element", "molecule", "life"] and s.groups["Category"] == ["Abstract"] * 4 and s.canonical is True


# ---- the same code paths on the stand-ins ----------------------------------------------------------
def test_parti_tsv_breakdowns_limit_and_published_check_on_the_stand_in(mini_parti, caplog):
    s = suite("parti", *mini_parti)
    assert len(s.prompts) == 6 and s.canonical is True and s.prompts[3] == "a fox behind three stacked crates"
    assert collections.Counter(s.groups["Category"]) == {"Abstract": 2, "Animals": 2, "Indoor Scenes": 2}
    assert s.groups["Challenge"][3] == "Properties & Positioning" and "Note" not in s.groups
    limited = suite("parti", *mini_parti, "suite.limit=3")
    assert limited.prompts == s.prompts[:3] and limited.groups["Category"] == ["Abstract", "Abstract", "Animals"] and limited.canonical is True
    assert "not the published prompt set" not in caplog.text
    assert suite("parti", mini_parti[0]).canonical is False and "not the published prompt set (6 prompts, expected 1632" in caplog.text


def test_pickapic_and_drawbench_stand_ins_keep_empty_prompts_and_categories(mini_data, caplog):
    s = suite("pickapic", f"suite.source={mini_data / PICKAPIC}")
    assert s.prompts[2] == "" and len(s.prompts) == 4 and s.groups == {} and s.canonical is False  # 4 of 500
    source = f"suite.source={mini_data / DRAWBENCH}"
    s = suite("drawbench", source, *published("suite=drawbench", source))
    assert s.canonical is True and s.groups["Category"] == ["Colors", "Colors", "Counting", "Positional", "Text"]
    other = suite("drawbench", f"suite.source={mini_data / 'drawbench' / 'drawbench.txt'}", *published("suite=drawbench", source))
    assert len(other.prompts) == 5 and other.canonical is False and other.groups == {}  # 2 prompts differ, no categories in a .txt
    assert "not the published prompt set (5 prompts, expected 5" in caplog.text


def test_hub_prompts_offline_without_a_cached_copy_is_one_line():
    with pytest.raises(DataError) as err:
        suite("parti")
    message = str(err.value)
    assert "\n" not in message and "nateraw/parti-prompts" in message and "bench prefetch suite=parti" in message and "suite.source=PATH" in message


@pytest.mark.parametrize(
    "name,text,expected",
    [
        ("bad.jsonl", '{"prompt": "a"}\n{not json\n', "line 2 is not valid JSON"),
        ("bad.tsv", "Text\tCategory\nonly\tx\n", None),  # `Text` is a prompt column: this one loads
        ("bad.csv", "title,category\na,b\n", "no column named prompt, caption, text"),
        ("bad.json", '{"prompt": "a"}', "expected a JSON list"),
    ],
)
def test_malformed_prompt_files_fail_with_one_line(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    if expected is None:
        assert suite("parti", f"suite.source={path}").prompts == ["only"]
        return
    with pytest.raises(DataError) as err:
        suite("parti", f"suite.source={path}")
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


# ---- end to end on the stand-ins ---------------------------------------------------------------------
def test_parti_eval_end_to_end_prints_its_breakdowns_with_tiny_scorers(cli, tmp_path, mini_parti):
    code, out, err = cli("eval", "suite=parti", "model=tiny", "suite.limit=4", *mini_parti, "scorers=tiny", "gen.steps=2")
    assert code == 0, err
    assert "scorers=tiny: random tiny scorers, scores NOT meaningful" in out
    assert "mean by Category (95% CI):" in out and "mean by Challenge (95% CI):" in out and "| Abstract" in out
    run_dir = next((tmp_path / "runs").iterdir())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["scorers"] == "tiny" and manifest["n_prompts"] == 4 and manifest["published_prompt_set"] is True
    assert manifest["metrics"]["pickscore"]["model_id"] == "tiny-random"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [g["by"] for g in summary["by_group"]] == ["Category", "Challenge"]



@pytest.mark.parametrize(
    "name, source, limit, breakdown, n_empty",
    [("pickapic", PICKAPIC, 3, None, 1), ("drawbench", DRAWBENCH, 4, "mean by Category (95% CI):", 0)],  # the stand-in Pick-a-Pic's empty prompt is number 2
)
def test_pickapic_and_drawbench_eval_end_to_end_with_tiny_scorers(cli, tmp_path, mini_data, name, source, limit, breakdown, n_empty):
    source = [f"suite.source={mini_data / source}"]
    code, out, err = cli("eval", f"suite={name}", "model=tiny", f"suite.limit={limit}", *source, *published(f"suite={name}", *source), "scorers=tiny", "gen.steps=1", "gen.batch_size=32")
    assert code == 0, err
    assert "scores NOT meaningful" in out and all(f"| {m}" in out for m in ["pickscore", "hpsv2.1", "imagereward", "aesthetic", "clip-h14"])
    assert (breakdown in out) if breakdown else "mean by" not in out
    manifest = json.loads((next((tmp_path / "runs").iterdir()) / "manifest.json").read_text())
    assert manifest["n_prompts"] == limit and manifest["n_empty_prompts"] == n_empty and manifest["published_prompt_set"] is True


# ---- the paper presets of issues 3 and 4 on the parti suite, with tiny stand-ins for SDXL, the scorers and the prompts

@pytest.mark.slow  # a paper preset run (about 11 s); tests/test_preference_methods.py trains offline PSO by default
def test_offline_pso_paper_preset_runs_on_parti(cli, pairs_parquet, mini_parti):
    """`bench run suite=parti model=sdxl-dmd2 method=pso-offline-dmd2`, with the SDXL-layout tiny model,
    a local Pick-a-Pic-schema parquet for the preset's `base_data: pickapic-v2`, and tiny scorers."""
    code, out, err = cli(
        "run", "suite=parti", "model=tiny-sdxl-fewstep", "method=pso-offline-dmd2", f"data={pairs_parquet}", "data.shuffle_buffer=0",
        *mini_parti, "suite.limit=4", "scorers=tiny", "train.steps=2", "train.batch_size=2", "train.save_every=100",
    )
    assert code == 0, err
    assert "| pickscore" in out and "| clip-h14" in out and "mean by Category (95% CI):" in out


@pytest.mark.slow  # a paper preset run (about 11 s); tests/test_pso_online.py runs online PSO by default
def test_online_pso_paper_preset_runs_on_parti_with_pickscore_and_the_4k_prompts(cli, mini_data, mini_parti):
    """`bench run suite=parti model=sdxl-turbo method=pso-online-turbo`: PickScore labels the pairs (tiny
    scorer here), the training prompts are SPO's 4k Pick-a-Pic prompts (the local copy)."""
    code, out, err = cli(
        "run", "suite=parti", "model=tiny-sdxl-fewstep", "method=pso-online-turbo", f"method.train_prompts={mini_data / 'pickapic' / '4k_training_prompts.json'}",
        "method.prompts_per_round=2", *mini_parti, "suite.limit=4", "scorers=tiny", "train.steps=2", "train.batch_size=2", "train.save_every=100",
    )
    assert code == 0, err
    assert "| pickscore" in out and "win rate vs base" in out


def test_online_preset_offline_without_its_prompt_file_is_one_line(cli, mini_parti):
    code, out, err = cli("train", "suite=parti", "model=tiny-sdxl-fewstep", "method=pso-online-turbo", *mini_parti, "scorers=tiny")
    assert code != 0 and "4k_training_prompts.json" in err and "method.train_prompts=PATH" in err and "bench prefetch method=pso-online-turbo" in err
    assert len(err.strip().splitlines()) == 1


def test_prefetch_with_the_hub_offline_is_one_line(cli):
    code, out, err = cli("prefetch", "model=sdxl-turbo", "metrics=pickscore")
    assert code != 0 and "bench prefetch could not download" in err and "HF_HUB_OFFLINE unset" in err and len(err.strip().splitlines()) == 1


def prompt_sets_suite(folder, **extra):
    """A suite published as one prompt file per set (the HPSv2 and T2I-CompBench layout)."""
    return {
        "name": "sets",
        "prompt_sets": {"warm": "https://example.org/sets/warm.txt", "cold": {"hub": "someone/sets", "file": "bench/cold.json"}},
        "prompt_set_column": "style",
        "source": str(folder),
        "metrics": ["brightness", "colorfulness"],
        **extra,
    }


def test_prompt_sets_read_every_file_from_a_local_folder_labelled_by_set(tmp_path):
    (tmp_path / "warm.txt").write_text("a red sun\na fire\na desert\n")
    (tmp_path / "cold.json").write_text(json.dumps(["snow", "ice"]))
    s = load_suite(prompt_sets_suite(tmp_path))
    assert s.prompts == ["a red sun", "a fire", "a desert", "snow", "ice"]
    assert s.groups == {"style": ["warm"] * 3 + ["cold"] * 2} and s.metric_scope == {}
    limited = load_suite(prompt_sets_suite(tmp_path, limit=2))  # the first 2 of every set
    assert limited.prompts == ["a red sun", "a fire", "snow", "ice"] and limited.groups["style"] == ["warm", "warm", "cold", "cold"]
    scoped = load_suite(prompt_sets_suite(tmp_path, limit=2, metric_scope={"colorfulness": ["cold"]}))
    assert scoped.metric_scope == {"colorfulness": [False, False, True, True]}


def test_prompt_sets_name_the_missing_file_or_folder(tmp_path):
    (tmp_path / "warm.txt").write_text("a red sun\n")
    with pytest.raises(DataError, match=r"prompt file not found: .*cold\.json"):
        load_suite(prompt_sets_suite(tmp_path))
    with pytest.raises(DataError, match=r"suite.source=.*nowhere is not a folder: suite 'sets' reads its prompt files warm.txt, cold.json"):
        load_suite(prompt_sets_suite(tmp_path / "nowhere"))
    (tmp_path / "cold.json").write_text('["snow"]')
    with pytest.raises(DataError, match=r"metric_scope of colorfulness names unknown sets \['hot'\]"):
        load_suite(prompt_sets_suite(tmp_path, metric_scope={"colorfulness": ["hot"]}))


def test_json_object_of_records_is_read_with_its_ids(tmp_path):
    path = tmp_path / "meta_data.json"  # MJHQ-30K's layout
    path.write_text(json.dumps({"a1": {"prompt": "a cat", "category": "animals"}, "b2": {"prompt": "a car", "category": "vehicles"}}))
    from bench.suite import read_prompt_rows

    assert read_prompt_rows(path) == [{"id": "a1", "prompt": "a cat", "category": "animals"}, {"id": "b2", "prompt": "a car", "category": "vehicles"}]


def test_csv_prompts_keep_quoted_newlines(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_bytes(b'image_id,prompt\r\n1,"two\nlines"\r\n2, padded \r\n')
    from bench.suite import read_prompts

    assert read_prompts(path) == ["two\nlines", " padded "]
