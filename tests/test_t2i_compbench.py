"""T2I-CompBench: the suite on the official validation files (BENCH_TEST_DATA) and on the stand-ins of
tests/data/mini, its per-category metrics, LaSRO's reward.

The decision rules are checked on hand-built parses and boxes against numbers worked out by hand from
the official scripts; BLIP-VQA's P(yes) against salesforce-lavis's BLIP in a separate venv (slow).
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.errors import DataError, UsageError, WeightsMissingError
from bench.metrics import compbench as cb
from bench.metrics.nlp import TinyDoc, TinyParser, Token
from bench.metrics.vqa import AttributeBinding, BlipVqa, product_score
from bench.registry import SUITES
from bench.suite import load_suite
from conftest import stand_in

DATA = "t2i-compbench"  # relative to the data folder: the real one or tests/data/mini
CATEGORIES = ["color", "shape", "texture", "spatial", "3d_spatial", "non_spatial", "numeracy", "complex"]
METRIC_OF = {
    "color": "blip-vqa", "shape": "blip-vqa", "texture": "blip-vqa", "non_spatial": "clip-b32", "spatial": "t2i-spatial-owlv2",
    "3d_spatial": "t2i-3d-spatial-owlv2", "numeracy": "t2i-numeracy-owlv2", "complex": "t2i-complex-3in1-owlv2",
}


def suite_cfg(**extra):
    from bench.config import compose, to_dict

    return {**to_dict(compose(["suite=t2i-compbench"]))["suite"], **extra}


def doc(*tagged: str) -> TinyDoc:
    """A parse written by hand: ``doc("a/DET", "girl/NOUN", ...)``."""
    return TinyDoc([Token(t.rsplit("/", 1)[0], t.rsplit("/", 1)[1], i) for i, t in enumerate(tagged)])


# --------------------------------------------------------------------------- the suite


@pytest.fixture
def mini(mini_data):
    """The stand-in folder of the eight files (2 prompts each, 3 complex ones)."""
    return mini_data / DATA


@pytest.fixture
def mini_suite(mini):
    """Overrides for the suite on the stand-in folder, recorded as the published set."""
    return stand_in("t2i-compbench", mini)


def test_the_suite_reads_the_eight_official_validation_files(shared_data):
    suite = load_suite(suite_cfg(source=str(shared_data / DATA)))
    assert len(suite.prompts) == 2400 and suite.canonical is True
    assert suite.groups["category"] == [c for c in CATEGORIES for _ in range(300)]
    assert suite.sha256 == suite_cfg()["canonical"]["sha256"] == "924ccb586ce51303779e671261a59a07deab2482ff53911dc8d6fccfc53e8d4e"
    assert suite.prompts[0] == "a green bench and a blue bowl" and suite.prompts[-1].endswith(".") and "\r" not in "".join(suite.prompts)
    assert suite.images_per_prompt == 10
    for metric, scope in suite.metric_scope.items():  # each metric scores its own categories' prompts only
        assert sorted({c for c, s in zip(suite.groups["category"], scope) if s}) == sorted(c for c, m in METRIC_OF.items() if m == metric)
    assert not any(s and c == "color" for c, s in zip(suite.groups["category"], suite.metric_scope["t2i-spatial-owlv2"]))
    limited = load_suite(suite_cfg(source=str(shared_data / DATA), limit=4))
    assert len(limited.prompts) == 32 and limited.canonical is True  # canonical is judged before the limit


def test_the_suite_reads_eight_files_labelled_and_scoped_by_category(mini, mini_suite):
    from bench.config import compose, to_dict

    cfg = to_dict(compose(["suite=t2i-compbench", *mini_suite]))["suite"]
    suite = load_suite(cfg)
    sizes = {c: 3 if c == "complex" else 2 for c in CATEGORIES}
    assert len(suite.prompts) == 17 and suite.canonical is True and suite.images_per_prompt == 10
    assert suite.groups["category"] == [c for c in CATEGORIES for _ in range(sizes[c])]
    assert suite.prompts[0] == "a green bench and a red vase" and suite.prompts[-1].endswith("pillow.")
    for metric, scope in suite.metric_scope.items():
        assert sorted({c for c, s in zip(suite.groups["category"], scope) if s}) == sorted(c for c, m in METRIC_OF.items() if m == metric)
    limited = load_suite(cfg | {"limit": 1})
    assert limited.prompts == [official_lines(mini, c)[0] for c in CATEGORIES] and limited.canonical is True  # judged before the limit
    assert load_suite(suite_cfg(source=str(mini))).canonical is False  # 17 of 2,400


def test_the_suite_downloads_the_pinned_official_files_and_says_what_is_not_canonical(shared_data):
    cfg = suite_cfg()
    commit = "1b7094991a57f3c22abdd4f6e8ba6c1a15517073"
    assert list(cfg["prompt_sets"]) == CATEGORIES
    for c, url in cfg["prompt_sets"].items():  # each pinned to the sha256 of the file at that commit (shared/data holds it unmodified)
        digest = hashlib.sha256((shared_data / DATA / f"{c}_val.txt").read_bytes()).hexdigest()
        assert url == f"https://raw.githubusercontent.com/Karine-Huang/T2I-CompBench/{commit}/examples/dataset/{c}_val.txt#sha256={digest}"
    assert "NON-CANONICAL" in SUITES.entry("t2i-compbench").description
    text = Path(SUITES.entry("t2i-compbench").target).read_text()
    assert "UniDet" in text and "NON-CANONICAL" in text


def test_a_malformed_or_missing_prompt_file_is_one_line(tmp_path, cli, mini):
    for c in CATEGORIES:
        shutil.copy(mini / f"{c}_val.txt", tmp_path / f"{c}_val.txt")
    (tmp_path / "numeracy_val.txt").write_bytes(b"two boys\n\xff\xfe cats\n")
    code, out, err = cli("eval", "suite=t2i-compbench", "model=tiny", "suite.limit=1", f"suite.source={tmp_path}", "scorers=tiny")
    assert code != 0 and err.strip().count("\n") == 0
    assert "malformed prompt file" in err and "numeracy_val.txt" in err and "not UTF-8" in err
    (tmp_path / "complex_val.txt").unlink()
    (tmp_path / "numeracy_val.txt").write_text("two boys\n")
    code, out, err = cli("eval", "suite=t2i-compbench", "model=tiny", "suite.limit=1", f"suite.source={tmp_path}", "scorers=tiny")
    assert code != 0 and err.strip().count("\n") == 0 and "prompt file not found" in err and "complex_val.txt" in err


LIMIT = 1  # `suite.limit=4` gives the same table with 4x the images (about a minute on 2 cores)


@pytest.mark.slow  # a full suite evaluation with four tiny scorers (about 15 s); the metrics' own tests run by default
def test_eval_with_tiny_scorers_prints_one_metric_per_category(cli, tmp_path, mini, mini_suite):
    code, out, err = cli("eval", "suite=t2i-compbench", "model=tiny", f"suite.limit={LIMIT}", *mini_suite, "scorers=tiny")
    assert code == 0, err
    assert "NOT meaningful" in out and "mean by category" in out
    lines = out.split("mean by category", 1)[1].splitlines()
    header = [h.strip() for h in next(line for line in lines if line.startswith("| category")).strip("|").split("|")]
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ") and not line.startswith("| category"))}
    assert sorted(rows) == sorted(CATEGORIES)
    for category, row in rows.items():
        cells = dict(zip(header, row))
        assert cells["prompts"] == str(LIMIT)
        filled = [m for m in METRIC_OF.values() if cells[m] != "-"]
        assert filled == [METRIC_OF[category]] * filled.count(METRIC_OF[category]) and len(set(filled)) == 1, (category, cells)
        assert 0 <= float(cells[METRIC_OF[category]].split()[0]) <= 1 or METRIC_OF[category] == "clip-b32"  # "mean [interval]"
    run_dir = Path(out.strip().splitlines()[-1].split("run folder:")[1].strip())
    scores = pd.read_parquet(run_dir / "scores.parquet")
    category = {p: c for c in CATEGORIES for p in official_lines(mini, c, LIMIT)}
    scores["category"] = scores["prompt"].map(category)
    assert len(scores) == 8 * LIMIT * 10
    for metric in set(METRIC_OF.values()):  # a color prompt is never scored by the spatial metric, and so on
        scored = scores[scores[metric].notna()]["category"]
        assert set(scored) == {c for c, m in METRIC_OF.items() if m == metric} and len(scored) == 10 * LIMIT * len(set(scored))


# --------------------------------------------------------------------------- BLIP-VQA and LaSRO's reward


def stub_answers(monkeypatch, cls, answers):
    """P(yes) of every asked question from ``answers`` (in the order asked); records the questions."""
    asked = []

    def p_yes(self, images, questions, owners, batch_size=64):
        asked.extend(zip(owners, questions))
        return torch.tensor([answers[q] for q in questions], dtype=torch.float32)

    monkeypatch.setattr(cls, "p_yes", p_yes)
    return asked


def test_blip_vqa_is_the_rounded_product_of_p_yes_over_noun_chunks(monkeypatch):
    metric = BlipVqa("tiny")  # the tiny parser: "a green bench" and "a red car" are the chunks
    asked = stub_answers(monkeypatch, BlipVqa, {"a green bench?": 0.91236, "a red car?": 0.50004, "birds?": 0.33333})
    prompts = ["a green bench and a red car", "birds", "of"]
    scores = metric.score(torch.rand(3, 3, 32, 32), prompts)
    # BLIP_vqa.py: each answer written as '{:.4f}', float32 product, written as '{:.4f}' again
    assert scores.tolist() == [round(0.9124 * 0.5000, 4), 0.3333, 1.0]  # no noun chunk: the empty product
    assert asked == [(0, "a green bench?"), (0, "a red car?"), (1, "birds?")]
    assert product_score([0.99995, 0.99995]) == 1.0 and product_score([0.12344, 0.5]) == 0.0617
    many = " and ".join(f"a red thing{i}" for i in range(10))
    assert len(metric.questions(many)) == 8  # --np_num 8


def test_attribute_binding_is_the_fraction_of_yes_answers(monkeypatch):
    metric = AttributeBinding("tiny")
    assert metric.questions("a green bench and a red car") == ["is there a bench?", "is the bench green?", "is there a car?", "is the car red?"]
    answers = {"is there a bench?": 0.9, "is the bench green?": 0.2, "is there a car?": 0.51, "is the car red?": 0.5, "is there birds?": 0.7}
    stub_answers(monkeypatch, BlipVqa, answers)
    scores = metric.score(torch.rand(3, 3, 32, 32), ["a green bench and a red car", "birds", "of"])
    assert scores.tolist() == [2 / 4, 1.0, 1.0]  # yes = P(yes) > 0.5; 0.5 itself is "no"
    custom = AttributeBinding("tiny", exist_template="does the image show {subject}?", attribute_template="is it a {attribute} {noun}?")
    assert custom.questions("a green bench") == ["does the image show a bench?", "is it a green bench?"]
    assert metric.backbone() == BlipVqa("tiny").backbone()  # one loaded BLIP for both


def test_blip_vqa_batches_pairs_and_shares_the_model(monkeypatch):
    from bench.metrics import _LOADED

    metric, reward = BlipVqa("tiny"), AttributeBinding("tiny")
    images = torch.rand(2, 3, 40, 40)
    pairs = [(0, "a cat?"), (0, "is the very long dog brown?"), (1, "a cat?")]  # different lengths: no padding may leak in
    p = metric.p_yes(images, [q for _, q in pairs], [i for i, _ in pairs], batch_size=2)
    alone = torch.cat([metric.p_yes(images[i : i + 1], [q], [0]) for i, q in pairs])
    assert p.shape == (3,) and torch.allclose(p, alone, atol=1e-6) and ((p > 0) & (p < 1)).all()
    assert sum(1 for k in _LOADED if k[0] == "blip-vqa") == 1 and reward.loaded() is metric.loaded()
    assert "tiny-random" in metric.info.version and "NOT MEANINGFUL" in reward.info.scale


def blip_training_checkpoint(path: Path, extra: dict | None = None) -> dict:
    """A checkpoint in the layout BLIP's train_vqa.py saves: model and optimizer state dicts, the
    training config as PyYAML parses configs/vqa.yaml (plain strings, numbers, a list, a bool; PyYAML
    reads 2e-5 as a string; the safe loader gives the same objects) and the epoch; here on the tiny BLIP."""
    import yaml

    model = BlipVqa("tiny").load_tiny()[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.05)
    model.vision_model.embeddings.class_embedding.sum().backward()
    optimizer.step()
    config = yaml.safe_load("vqa_root: '/data/vqa/'\ntrain_files: ['vqa_train', 'vqa_val', 'vg_qa']\npretrained: 'model_base.pth'\nvit: 'base'\n"
                            "batch_size_train: 16\nvit_grad_ckpt: False\ninit_lr: 2e-5\nimage_size: 480\nweight_decay: 0.05\nmin_lr: 0\n")
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config, "epoch": 9, **(extra or {})}
    torch.save(saved, path)
    return saved


def test_blip_checkpoints_load_through_the_weights_only_unpickler(tmp_path):
    from bench.metrics.vqa import blip_state_dict, load_checkpoint

    saved = blip_training_checkpoint(tmp_path / "blip.pth")
    loaded = load_checkpoint(tmp_path / "blip.pth")
    assert set(loaded) == {"model", "optimizer", "config", "epoch"}
    assert loaded["config"] == saved["config"] and loaded["config"]["init_lr"] == "2e-5" and loaded["epoch"] == 9
    assert loaded["model"].keys() == saved["model"].keys() and all(torch.equal(loaded["model"][k], v) for k, v in saved["model"].items())
    assert blip_state_dict(loaded).keys() == saved["model"].keys() - {k for k in saved["model"] if k.endswith("position_ids")}


class Payload:
    """What an attacker would pickle: unpickling it calls open(marker, "w")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_pickling_any_other_class_is_refused_in_one_line_and_never_unpickled(tmp_path):
    import argparse

    from bench.metrics.vqa import load_checkpoint

    marker = tmp_path / "executed"
    cases = {"namespace.pth": ({"args": argparse.Namespace(lr=2e-5)}, "argparse.Namespace"), "payload.pth": ({"config": Payload(marker)}, "io.open")}
    for name, (extra, cls) in cases.items():
        blip_training_checkpoint(tmp_path / name, extra)
        with pytest.raises(DataError) as err:
            load_checkpoint(tmp_path / name)
        assert str(err.value) == (f"{tmp_path / name} pickles {cls} besides tensors, which bench never unpickles: "
                                  "it is not the published checkpoint; delete it and download the official file again")
    assert not marker.exists()


# --------------------------------------------------------------------------- the parser


def official_lines(folder, category, n=None):
    return folder.joinpath(f"{category}_val.txt").read_text(encoding="utf-8").splitlines()[:n]


@pytest.mark.slow
def test_noun_chunks_of_official_prompts_with_en_core_web_sm():
    """Needs spaCy (``pip install -e ".[compbench]"``) and en_core_web_sm (``bench prefetch metrics=blip-vqa``
    or BENCH_SPACY_MODEL=folder-or-wheel): fails, never skips, without them."""
    from bench.metrics.nlp import english

    try:
        nlp = english("official", "blip-vqa")
    except (ImportError, WeightsMissingError, UsageError) as err:
        pytest.fail(f"the real English parser is needed here: {err}")
    chunks = lambda p: [c.text for c in nlp(p).noun_chunks]  # noqa: E731
    # official prompts (the first of color, shape, texture and complex, the second of shape and spatial)
    assert chunks("a green bench and a blue bowl") == ["a green bench", "a blue bowl"]
    assert chunks("an oblong cucumber and a teardrop plum") == ["an oblong cucumber", "a teardrop plum"]
    assert chunks("a plastic toy and a glass bottle") == ["a plastic toy", "a glass bottle"]
    assert BlipVqa("official").questions("a pentagonal stop sign and a spherical traffic light") == ["a pentagonal stop sign?", "a spherical traffic light?"]
    assert cb.spatial_objects(nlp("a girl on the top of a frog")) == ("person", "frog")
    assert cb.spatial_objects(nlp("The red hat was on top of the brown coat rack."), complex_prompt=True) == ("hat", "coat")  # the first noun after "on top of"


def test_the_tiny_parser_needs_no_spacy():
    d = TinyParser()("a girl on the left of a brown chair")
    assert [c.text for c in d.noun_chunks] == ["a girl", "a brown chair"]
    assert [t.text for t in d if t.pos_ == "NOUN"] == ["girl", "chair"] and d[2:5].text == "on the left"


def test_a_missing_spacy_or_parser_model_is_one_line(monkeypatch, tmp_path):
    from bench.metrics import _LOADED
    from bench.metrics.nlp import english

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    for key in [k for k in _LOADED if k[0] == "spacy"]:
        monkeypatch.delitem(_LOADED, key)
    import importlib.util

    if importlib.util.find_spec("spacy") is None:
        with pytest.raises(UsageError, match=r'^metric blip-vqa parses prompts with spaCy, which is not installed: pip install "spacy>=3.8,<3.9"$'):
            english("official", "blip-vqa")
        return
    monkeypatch.setenv("BENCH_SPACY_MODEL", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="BENCH_SPACY_MODEL=.*does not exist"):
        english("official", "blip-vqa")


# --------------------------------------------------------------------------- offline


def test_offline_without_weights_is_one_line_naming_the_files_and_prefetch(monkeypatch, tmp_path):
    from bench.metrics import _LOADED

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(BlipVqa, "parser", lambda self: TinyParser())
    for key in [k for k in _LOADED if k[0] in ("blip-vqa", "OwlDetector")]:
        monkeypatch.delitem(_LOADED, key)
    with pytest.raises(WeightsMissingError) as err:
        BlipVqa().score(torch.rand(1, 3, 32, 32), ["a red car"])
    message = str(err.value)
    assert "\n" not in message and "model_base_vqa_capfilt_large.pth" in message and "`bench prefetch metrics=blip-vqa`" in message and "scorers=tiny" in message
    metric = cb.Spatial2D()
    monkeypatch.setattr(cb.Spatial2D, "parser", lambda self: TinyParser())
    with pytest.raises(WeightsMissingError) as err:
        metric.score(torch.rand(1, 3, 32, 32), ["a dog next to a cat"])
    assert "\n" not in str(err.value) and "google/owlv2-base-patch16-ensemble" in str(err.value) and "`bench prefetch metrics=t2i-spatial-owlv2`" in str(err.value)


def test_eval_with_the_official_scorers_offline_is_one_line(cli, tmp_path, monkeypatch, mini):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, out, err = cli("eval", "suite=t2i-compbench", "model=tiny", "suite.limit=1", "suite.images_per_prompt=1", f"suite.source={mini}")
    assert code != 0 and err.strip().count("\n") == 0, err
    assert "`bench prefetch metrics=blip-vqa`" in err or 'pip install "spacy>=3.8,<3.9"' in err  # whichever is missing first


# --------------------------------------------------------------------------- the official decision rules


def test_the_2d_position_rule():
    left, right = (10, 100, 110, 200), (300, 110, 400, 210)
    box = lambda b: cb._box(b)  # noqa: E731
    assert cb.position_score("on the left of", box(left), box(right)) == 1  # dx = 290 > |dy| = 10, no overlap
    assert cb.position_score("on the right of", box(left), box(right)) == 0
    assert cb.position_score("on the right of", box(right), box(left)) == 1
    assert cb.position_score("on the top of", box((0, 0, 100, 50)), box((0, 300, 100, 350))) == 1
    assert cb.position_score("on the bottom of", box((0, 0, 100, 50)), box((0, 300, 100, 350))) == 0
    assert cb.position_score("on top of", box((0, 0, 100, 50)), box((0, 300, 100, 350))) == 0  # no rule for it upstream
    overlap_a, overlap_b = (0, 0, 100, 100), (50, 0, 150, 100)  # IoU 1/3, dx 50 > dy 0
    assert cb.position_score("on the left of", box(overlap_a), box(overlap_b)) == pytest.approx(0.1 / (1 / 3))
    far = (400, 400, 420, 420)  # centers 400 apart in x and y: 150 / 400
    assert cb.position_score("next to", box((0, 0, 20, 20)), box(far)) == pytest.approx(150 / 400)
    assert cb.position_score("near", box((0, 0, 20, 20)), box((300, 0, 320, 20))) == 1  # |dy| = 0 < 150


def test_the_2d_spatial_score():
    d = doc("a/DET", "girl/NOUN", "on/ADP", "the/DET", "left/NOUN", "of/ADP", "a/DET", "chair/NOUN")
    assert cb.spatial_objects(d) == ("person", "chair")
    person, chair = cb.Detection("person", 0.8, (10, 100, 110, 200)), cb.Detection("chair", 0.6, (300, 110, 400, 210))
    prompt = "a girl on the left of a chair"
    assert cb.spatial_score(prompt, d, [person, chair]) == pytest.approx(0.25 * 0.8 + 0.25 * 0.6 + 0.5)
    assert cb.spatial_score(prompt.replace("left", "right"), d, [person, chair]) == 0.0  # 0.35 < 0.5
    assert cb.spatial_score(prompt, d, [person]) == 0.0  # one object: 0.2 < 0.5
    weaker = cb.Detection("chair", 0.3, (0, 0, 5, 5))
    assert cb.spatial_score(prompt, d, [person, chair, weaker]) == pytest.approx(0.85)  # the first (best) box of a label


def test_the_complex_prompts_object_rule():
    d = doc("The/DET", "red/ADJ", "hat/NOUN", "was/AUX", "on/ADP", "top/NOUN", "of/ADP", "the/DET", "brown/ADJ", "coat/NOUN", "rack/NOUN", "./PUNCT")
    assert cb.spatial_objects(d, complex_prompt=True) == ("hat", "coat")  # the first noun after "on top of"
    two = doc("The/DET", "cat/NOUN", "sat/VERB", "next/ADJ", "to/ADP", "a/DET", "dog/NOUN", "near/ADP", "a/DET", "tree/NOUN")
    assert cb.spatial_objects(two, complex_prompt=True) == (None, None)  # four objects: not exactly two
    proper = doc("The/DET", "boy/NOUN", "stood/VERB", "near/ADP", "Big/PROPN", "Ben/PROPN", "today/ADV")
    assert cb.spatial_objects(proper, complex_prompt=True) == ("person", "Ben")


def test_the_3d_rule_reads_depth_inside_the_boxes_as_indexed_upstream():
    depth = torch.zeros(479, 479)
    depth[0:100, :] = 0.9  # rows 0-99: the official code indexes depth[x, y], so this is x in [0, 100)
    d = doc("a/DET", "dog/NOUN", "in/ADP", "front/NOUN", "of/ADP", "a/DET", "desk/NOUN")
    dog, desk = cb.Detection("dog", 0.9, (0, 0, 100, 100)), cb.Detection("desk", 0.7, (50, 0, 150, 100))  # IoU 1/3
    score = cb.spatial_3d_score("a dog in front of a desk", d, [dog, desk], depth)
    assert score == pytest.approx(0.25 * 0.9 + 0.25 * 0.7 + (1 / 3) / 0.5 / 2)  # dog closer, 0 < IoU < 0.5: IoU / 0.5
    assert cb.spatial_3d_score("a dog behind a desk", d, [dog, desk], depth) == pytest.approx(0.4)
    apart = cb.Detection("desk", 0.7, (200, 0, 300, 100))
    assert cb.spatial_3d_score("a dog in front of a desk", d, [dog, apart], depth) == pytest.approx(0.4)  # no overlap: 0
    assert cb.spatial_3d_score("a dog in front of a desk", d, [desk], depth) == pytest.approx(0.25 * 0.7)


def test_the_numeracy_rule():
    d = doc("three/NUM", "cats/NOUN", "and/CCONJ", "a/DET", "dog/NOUN")
    assert cb.numeracy_objects(d) == (["cat", "dog"], [3, 1])
    cats = [cb.Detection("cat", 0.9, (0, 0, 50, 50)), cb.Detection("cat", 0.8, (100, 0, 150, 50)), cb.Detection("cat", 0.7, (2, 1, 50, 50))]
    dog = cb.Detection("dog", 0.6, (200, 200, 300, 300))
    assert cb.numeracy_score(d, cats + [dog]) == 0.5 / 2 + 0.5  # the third cat repeats the first (IoU > 0.9): 2 cats
    assert cb.numeracy_score(d, cats[:2] + [cb.Detection("cat", 0.5, (300, 0, 350, 50)), dog]) == 1.0
    assert cb.numeracy_score(d, []) == 0.0
    boys = doc("two/NUM", "boys/NOUN")
    assert cb.numeracy_objects(boys) == (["boy"], [2])
    assert cb.numeracy_score(boys, [cb.Detection("person", 0.9, (0, 0, 50, 50)), cb.Detection("person", 0.9, (100, 0, 150, 50))]) == 1.0
    assert cb.numeracy_objects(doc("a/DET", "cats/NOUN")) == (["cat"], [])  # word2number("a") fails upstream: no count


def test_the_official_complex_prompts_split_into_their_sub_lists(shared_data):
    kinds = [cb.complex_kind(p) for p in official_lines(shared_data / DATA, "complex")]
    assert (kinds.count("spatial"), kinds.count("action"), kinds.count("spatialaction")) == (58, 212, 30)


def test_the_complex_sub_lists_and_the_3_in_1_mean(mini):
    assert [cb.complex_kind(p) for p in official_lines(mini, "complex")] == ["spatial", "action", "spatialaction"]
    assert cb.complex_kind("The red hat was on top of the brown coat rack.") == "spatial"
    assert cb.complex_kind("the black phone was resting on the brown charger") == "action"  # up to the first ".", lower case
    assert cb.complex_kind("The sleek black cat sat on top of the fluffy white pillow.") == "spatialaction"
    assert cb.three_in_one("spatial", 0.5, 0.8, 0.2) == pytest.approx(0.65)
    assert cb.three_in_one("action", 0.5, 0.8, 0.2) == pytest.approx(0.35)
    assert cb.three_in_one("spatialaction", 0.5, 0.8, 0.2) == pytest.approx(0.5)


def test_complex_3in1_combines_its_parts_per_prompt(monkeypatch):
    metric = cb.Complex3in1("tiny")
    monkeypatch.setattr(BlipVqa, "score", lambda self, images, prompts, refs=None: torch.tensor([0.4, 0.6], dtype=torch.float64))
    monkeypatch.setattr(cb.ComplexSpatial, "score", lambda self, images, prompts, refs=None: torch.tensor([1.0, 0.0], dtype=torch.float64))
    seen = []
    monkeypatch.setattr(cb.Complex3in1, "action_scores", lambda self, images, prompts: seen.extend(prompts) or torch.tensor([0.3, 0.2], dtype=torch.float64))
    prompts = ["The red hat was on top of the brown coat rack.", "The black phone was resting on the brown charger."]
    assert metric.score(torch.rand(2, 3, 32, 32), prompts).tolist() == pytest.approx([(1.0 + 0.4) / 2, (0.2 + 0.6) / 2])
    monkeypatch.undo()
    texts = []
    clip = metric.parts["action"]
    monkeypatch.setattr(type(clip), "embed_texts", lambda self, t: texts.extend(t) or torch.ones(len(t), 4) / 2)
    monkeypatch.setattr(type(clip), "embed_images", lambda self, im: torch.ones(len(im), 4) / 2)
    metric.action_scores(torch.rand(1, 3, 32, 32), ["the red hat was on the rack"])
    assert texts == ["the hat was on the rack"]  # CLIP_similarity.py --complex: adjectives dropped


def test_owlv2_boxes_come_in_the_official_frame_best_first():
    assert cb.official_frame(512, 512) == (479, 479) and cb.official_frame(1024, 768) == (360, 480) and cb.official_frame(768, 1024) == (480, 360)
    detector = cb.OwlDetector("tiny")
    detector.threshold = 0.0
    found = detector.detect(torch.rand(2, 3, 64, 64), [["cat", "dog"], []])
    assert found[1] == [] and found[0] and {d.label for d in found[0]} <= {"cat", "dog"}
    assert [d.score for d in found[0]] == sorted((d.score for d in found[0]), reverse=True)
    assert all(0 <= v <= 479 for d in found[0] for v in d.box)


def test_midas_depth_map_is_the_official_8_bit_map_in_the_frame():
    maps = cb.MidasDepth("tiny").depth_maps(torch.rand(2, 3, 64, 96))
    assert maps[0].shape == cb.official_frame(96, 64) == (320, 480) and maps[0].min() >= 0 and maps[0].max() <= 1
    assert torch.equal(maps[0] * 255, (maps[0] * 255).round())


def test_owlv2_and_dpt_load_through_the_official_path_from_saved_files(tmp_path):
    """Small OWLv2 and DPT models saved as the hub repositories hold them load through ``load_official``."""
    from dataclasses import replace

    from transformers import CLIPTokenizer, Owlv2ImageProcessor, Owlv2Processor

    from bench.metrics.clip import clip_tokenizer_dir

    tiny_owl, _, _ = cb.OwlDetector("tiny").load_tiny()
    tiny_owl.save_pretrained(tmp_path / "owl")
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=CLIPTokenizer.from_pretrained(clip_tokenizer_dir())).save_pretrained(tmp_path / "owl")
    detector = cb.OwlDetector()
    detector.info = replace(detector.info, model_id=str(tmp_path / "owl"))
    detector.threshold = 0.0
    found = detector.detect(torch.rand(1, 3, 512, 512), [["dog"]])[0]
    assert found and all(d.label == "dog" for d in found) and all(0 <= v <= 479 for d in found for v in d.box)
    (tiny_dpt,) = cb.MidasDepth("tiny").load_tiny()
    tiny_dpt.save_pretrained(tmp_path / "dpt")
    depth = cb.MidasDepth()
    depth.info = replace(depth.info, model_id=str(tmp_path / "dpt"))
    depth.input_size = 64
    assert depth.depth_maps(torch.rand(1, 3, 512, 512))[0].shape == (479, 479)


def test_a_spacy_model_wheel_is_unpacked_once_into_the_cache(tmp_path, monkeypatch):
    import zipfile

    from bench.metrics.nlp import unpack_spacy_wheel

    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "en_core_web_sm-any-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:  # the layout of spaCy's model wheels
        z.writestr("en_core_web_sm/__init__.py", "")
        z.writestr("en_core_web_sm/en_core_web_sm-3.8.0/config.cfg", "[nlp]\n")
        z.writestr("en_core_web_sm/en_core_web_sm-3.8.0/parser/model", "weights")
        z.writestr("en_core_web_sm-3.8.0.dist-info/METADATA", "")
    folder = unpack_spacy_wheel(wheel)
    assert folder == tmp_path / "home" / "weights" / "spacy" / "en_core_web_sm-3.8.0"
    assert (folder / "config.cfg").read_text() == "[nlp]\n" and (folder / "parser" / "model").read_text() == "weights"
    assert unpack_spacy_wheel(wheel) == folder
    empty = tmp_path / "empty.whl"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(WeightsMissingError, match="holds no spaCy pipeline"):
        unpack_spacy_wheel(empty)


# --------------------------------------------------------------------------- parity with the official code (slow)

LAVIS_VENV = Path(os.environ.get("BENCH_LAVIS_PYTHON", "/tmp/venv-lavis/bin/python"))


def bert_like_vocab(directory: Path) -> Path:
    """30,522 tokens with bert-base-uncased's special and yes/no ids, letters and word pieces elsewhere."""
    tokens = [f"[unused{i}]" for i in range(30522)]
    for i, t in {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 2748: "yes", 2053: "no"}.items():
        tokens[i] = t
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789?,'-")
    for k, t in enumerate(chars + ["##" + c for c in chars] + ["red", "green", "blue", "bench", "car", "bowl", "cat", "the", "is", "there"]):
        tokens[1000 + k] = t
    assert len(set(tokens)) == 30522  # a repeated token would shift the ids of [DEC] and [ENC]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (directory / "tokenizer_config.json").write_text('{"do_lower_case": true, "model_max_length": 512}')
    return directory


@pytest.mark.slow
def test_blip_vqa_equals_t2i_compbench_on_lavis_blip_with_the_same_random_weights(tmp_path, monkeypatch):
    """salesforce-lavis (BLIP's code, whose blip_vqa vqav2 config is model_base_vqa_capfilt_large.pth at
    480) cannot live beside transformers 5: make a venv and point BENCH_LAVIS_PYTHON at its python:
    ``python -m venv --system-site-packages /tmp/venv-lavis``, then ``/tmp/venv-lavis/bin/pip install
    --no-deps salesforce-lavis transformers==4.33.3 "tokenizers<0.14" huggingface-hub==0.17.3 iopath
    portalocker decord webdataset braceexpand opencv-python-headless fairscale einops pycocoevalcap
    pycocotools`` and ``pip install "spacy>=3.8,<3.9"`` (lavis imports all of them)."""
    if not LAVIS_VENV.is_file():
        pytest.fail(f"no salesforce-lavis venv at {LAVIS_VENV} (see this test's docstring)")
    import numpy as np
    from PIL import Image

    from bench.metrics import _LOADED

    bert_like_vocab(tmp_path / "vocab")
    (tmp_path / "images").mkdir()
    g = np.random.default_rng(0)
    prompts = ["a green bench and a red car", "a blue bowl", "the cat is there"]
    pixels = [g.integers(0, 256, (512, 512, 3), dtype=np.uint8), g.integers(0, 256, (256, 384, 3), dtype=np.uint8), np.full((300, 300, 3), 200, np.uint8)]
    pixels[2][100:200, 50:250] = (255, 0, 0)
    monkeypatch.setattr(BlipVqa, "parser", lambda self: TinyParser())
    questions = {}
    for i, (p, px) in enumerate(zip(prompts, pixels)):
        Image.fromarray(px).save(tmp_path / "images" / f"{i}.png")
        questions[f"{i}.png"] = BlipVqa("tiny").questions(p) + ["Is there a car?!", "a red car" * 30]  # punctuation and truncation at 35 tokens
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    script = Path(__file__).parent / "reference" / "blip_vqa_lavis.py"
    run = subprocess.run([str(LAVIS_VENV), str(script), str(tmp_path)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    reference = json.loads((tmp_path / "reference.json").read_text())

    class Local(BlipVqa):
        checkpoint_url = str(tmp_path / "blip_vqa.pth")
        tokenizer_id = str(tmp_path / "vocab")

    metric = Local()
    try:
        for i, px in enumerate(pixels):  # each image alone: the images differ in size, as the official loader allows
            image = torch.from_numpy(px).permute(2, 0, 1)[None].float() / 255
            qs = questions[f"{i}.png"]
            ours = metric.p_yes(image, qs, [0] * len(qs))
            official = torch.tensor(reference[f"{i}.png"]["p_yes"])
            assert torch.allclose(ours, official, atol=1e-4, rtol=0), (i, ours, official)
            assert ours.std() > 1e-3  # the answers differ: a constant would prove nothing
            assert product_score(ours.tolist()) == reference[f"{i}.png"]["score"]
        batched = metric.p_yes(torch.from_numpy(pixels[0]).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1) / 255, questions["0.png"][:2], [0, 1])
        assert torch.allclose(batched, torch.tensor(reference["0.png"]["p_yes"][:2]), atol=1e-4, rtol=0)
    finally:
        for key in [k for k in _LOADED if k[0] == "blip-vqa" and str(tmp_path) in str(k)]:
            del _LOADED[key]
        import gc

        gc.collect()


def test_pinned_suite_and_files_refuse_to_load_offline(tmp_path, monkeypatch):
    """Without suite.source and offline, the pinned URL cannot be fetched: one line naming the prefetch."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"bench prefetch suite=t2i-compbench"):
        load_suite(suite_cfg(), cache=tmp_path)
