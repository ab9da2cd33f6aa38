"""GenEval: the suite on its official prompt file, the prompt -> metadata inversion, the official rules
worked by hand, the color classifier against clip_benchmark's, the detector's post-processing, and the
overall score (the mean of the tags' accuracies) with its interval.

The official ``evaluation_metadata.jsonl`` is not in this repository: ``official_metadata`` writes it
again the way ``prompts/create_prompts.py`` does (numpy's generator at seed 43, the six templates, the
de-duplication) and checks it byte for byte against the sha256 the suite downloads it under.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from bench import stats
from bench.io import split_pin
from bench.metrics import geneval as ge
from bench.registry import SUITES

OFFICIAL_TAG_COUNTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}


def create_prompts(seed: int = 43, n: int = 100) -> str:
    """GenEval's create_prompts.py, written again: the text of evaluation_metadata.jsonl."""
    names, colors, rng = ge.OBJECT_NAMES, ge.COLORS, np.random.default_rng(seed)
    k, person = len(names), names.index("person")
    one = lambda i, **extra: {"class": names[i], "count": 1, **extra}  # noqa: E731
    rows = [{"tag": "single_object", "include": [one(i)]} for i in rng.choice(k, size=k, replace=False)]
    for _ in range(n):
        a, b = rng.choice(k, size=2, replace=False)
        rows.append({"tag": "two_object", "include": [one(a), one(b)]})
    for _ in range(n):
        i, count = rng.choice(k), int(rng.integers(2, 4, endpoint=True))
        rows.append({"tag": "counting", "include": [{"class": names[i], "count": count}], "exclude": [{"class": names[i], "count": count + 1}]})
    for _ in range(n):
        i = (rng.choice(k - 1) + 1 + person) % k  # never a colored person
        rows.append({"tag": "colors", "include": [one(i, color=colors[rng.choice(len(colors))])]})
    for _ in range(n):
        a, b = rng.choice(k, size=2, replace=False)
        relation = ge.POSITIONS[rng.choice(len(ge.POSITIONS))]
        rows.append({"tag": "position", "include": [one(b), one(a, position=[relation, 0])]})
    for _ in range(n):
        a, b = (rng.choice(k - 1, size=2, replace=False) + 1 + person) % k
        ca, cb = rng.choice(len(colors), size=2, replace=False)
        rows.append({"tag": "color_attr", "include": [one(a, color=colors[ca]), one(b, color=colors[cb])]})
    seen, lines = set(), []
    for row in rows:
        keyed = {"tag": row["tag"], "include": row["include"], **({"exclude": row["exclude"]} if "exclude" in row else {})}
        keyed["prompt"] = ge.render_prompt(row["tag"], row["include"])
        key = json.dumps(keyed, sort_keys=True)
        if key not in seen:
            seen.add(key)
            lines.append(json.dumps(keyed))
    return "".join(f"{line}\n" for line in lines)


@pytest.fixture(scope="module")
def official_metadata(tmp_path_factory) -> Path:
    """evaluation_metadata.jsonl at af4902f, as the suite pins it."""
    text = create_prompts()
    pin = split_pin(yaml.safe_load(Path(SUITES.entry("geneval").target).read_text())["prompts"])[1]
    assert hashlib.sha256(text.encode()).hexdigest() == pin, "the rewritten create_prompts.py no longer gives the official file"
    path = tmp_path_factory.mktemp("geneval") / "evaluation_metadata.jsonl"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the suite and its prompts


def test_every_official_prompt_inverts_to_its_metadata(official_metadata):
    rows = [json.loads(line) for line in official_metadata.read_text().splitlines()]
    assert len(rows) == 553 and pd.Series([r["tag"] for r in rows]).value_counts().to_dict() == OFFICIAL_TAG_COUNTS
    assert [ge.geneval_spec(r["prompt"]) for r in rows] == rows
    assert ge.geneval_spec("a photo of a apple") is None and ge.geneval_spec("a photo of one cats") is None
    assert ge.geneval_spec("a photo of an orange")["include"] == [{"class": "orange", "count": 1}]  # the fruit, not the color
    assert ge.geneval_spec("a photo of a dog right of a teddy bear")["include"] == [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]


def test_the_suite_reads_the_official_file_as_the_published_set(official_metadata):
    from bench.config import compose, to_dict
    from bench.suite import load_suite

    suite = load_suite(to_dict(compose(["suite=geneval", f"suite.source={official_metadata}"]))["suite"])
    assert len(suite.prompts) == 553 and suite.canonical is True and suite.images_per_prompt == 4
    assert suite.overall_by == "tag" and sorted(set(suite.groups["tag"])) == sorted(OFFICIAL_TAG_COUNTS)
    limited = load_suite(to_dict(compose(["suite=geneval", f"suite.source={official_metadata}", "suite.limit=2"]))["suite"])
    assert pd.Series(limited.groups["tag"]).value_counts().to_dict() == dict.fromkeys(OFFICIAL_TAG_COUNTS, 2)
    assert "NON-CANONICAL" in SUITES.entry("geneval").description


def test_eval_prints_the_official_tags_and_the_overall_score(cli, tmp_path, official_metadata):
    code, out, err = cli("eval", "suite=geneval", "model=tiny", f"suite.source={official_metadata}", "suite.limit=1", "suite.images_per_prompt=1",
                         "scorers=tiny", "report.html=false", f"out={tmp_path}")
    assert code == 0, err
    table = out[out.index("mean by tag"):]
    assert all(f"| {tag} " in table for tag in OFFICIAL_TAG_COUNTS)
    assert "overall score: the mean of the 6 tag means" in out and "| geneval-m2f |" in out[out.index("overall score"):]
    summary = json.loads(next(tmp_path.glob("geneval-tiny-base-*/summary.json")).read_text())
    tags = summary["by_group"][0]["means"]["geneval-m2f"]
    assert summary["overall"]["metrics"]["geneval-m2f"]["mean"] == pytest.approx(np.mean(list(tags.values())))


# --------------------------------------------------------------------------- the official rules


def found(label: str, score: float, box, mask=None) -> ge.Instance:
    return ge.Instance(ge.OBJECT_NAMES.index(label), score, tuple(float(v) for v in box), mask)


def test_detections_are_kept_above_the_tag_threshold_best_first_sixteen_at_most():
    dets = [found("cat", 0.5, (0, 0, 10, 10)), found("cat", 0.95, (20, 0, 30, 10)), found("dog", 0.3, (0, 0, 5, 5)), found("dog", 0.31, (0, 0, 5, 5))]
    kept = ge.kept_objects(dets, "two_object")
    assert [d.score for d in kept["cat"]] == [0.95, 0.5] and [d.score for d in kept["dog"]] == [0.31]  # 0.3 is not above 0.3
    assert [d.score for d in ge.kept_objects(dets, "counting")["cat"]] == [0.95] and "dog" not in ge.kept_objects(dets, "counting")
    many = [found("cup", 0.4 + i / 100, (i, 0, i + 1, 1)) for i in range(20)]
    assert len(ge.kept_objects(many, "single_object")["cup"]) == 16
    overlapping = [found("cup", 0.9, (0, 0, 9, 9)), found("cup", 0.8, (0, 0, 9, 8)), found("cup", 0.7, (50, 50, 59, 59))]
    assert len(ge.kept_objects(overlapping, "single_object")["cup"]) == 3  # max_overlap 1.0: no NMS
    assert [d.score for d in ge.kept_objects(overlapping, "single_object", {**ge.OPTIONS, "max_overlap": 0.5})["cup"]] == [0.9, 0.7]
    assert ge.box_iou((0, 0, 9, 9), (0, 0, 9, 8)) == pytest.approx(90 / 100)


def test_relative_position_shrinks_the_offset_by_the_summed_sizes():
    # A at x 0-10, B at x 30-40 (same rows): offset -30, shrunk by 0.1 * (10 + 10) = 2 -> -28; |dx| = 28/30 > 0.5
    assert ge.relative_position((0, 0, 10, 10), (30, 0, 40, 10)) == {"left of"}
    assert ge.relative_position((30, 0, 40, 10), (0, 0, 10, 10)) == {"right of"}
    assert ge.relative_position((0, 0, 10, 10), (0, 50, 10, 60)) == {"above"}
    # a diagonal: both components 20 / 28.28 = 0.71 after shrinking by 0 on a zero-size box
    assert ge.relative_position((0, 0, 0, 0), (20, 20, 20, 20)) == {"left of", "above"}
    # centers 1 apart with 10-pixel boxes: the shrink (2) eats the offset
    assert ge.relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()


def test_judge_checks_counts_colors_positions_and_exclusions_in_order():
    never = lambda name, objs: pytest.fail("no color asked")  # noqa: E731
    spec = ge.geneval_spec("a photo of three cups")
    three = [found("cup", 0.95, (i * 20, 0, i * 20 + 10, 10)) for i in range(3)]
    assert ge.judge(spec, {"cup": three}, never) == (True, "")
    assert ge.judge(spec, {"cup": three[:2]}, never) == (False, "expected cup>=3, found 2")
    four = three + [found("cup", 0.95, (90, 0, 99, 10))]
    assert ge.judge(spec, {"cup": four}, never) == (False, "expected cup<4, found 4")

    spec = ge.geneval_spec("a photo of a red car and a blue bus")
    colors = {"car": ["red"], "bus": ["green"]}
    verdict = ge.judge(spec, {"car": [found("car", 0.9, (0, 0, 9, 9))], "bus": [found("bus", 0.9, (0, 0, 9, 9))]}, lambda n, o: colors[n])
    assert verdict == (False, "expected blue bus>=1, found 0 blue; and 1 green")

    spec = ge.geneval_spec("a photo of a dog left of a cat")
    cat, dog_left, dog_right = found("cat", 0.9, (50, 0, 60, 10)), found("dog", 0.9, (0, 0, 10, 10)), found("dog", 0.9, (90, 0, 99, 10))
    assert ge.judge(spec, {"cat": [cat], "dog": [dog_left]}, never) == (True, "")
    assert ge.judge(spec, {"cat": [cat], "dog": [dog_right]}, never) == (False, "expected dog left of target, found right of target")
    assert ge.judge(spec, {"dog": [dog_left]}, never) == (False, "expected cat>=1, found 0\nno target for dog to be left of")


def test_the_rules_give_the_official_evaluators_verdicts_and_reasons():
    """240 recorded cases (tests/parity/record_geneval_rules.py ran evaluate_images.py itself on them, its
    detector and color classifier replaced by the cases' detections and colors): the same verdict and
    the same reason, word for word, from kept_objects and judge."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "parity"))
    from record_geneval_rules import case_colors

    recorded = json.loads((Path(__file__).parent / "data" / "geneval_rules_parity.json").read_text())["cases"]
    assert len(recorded) == 240 and 0 < sum(c["correct"] for c in recorded) < 240
    for case in recorded:
        # mmdetection's boxes and scores are float32: the rules compare those values
        dets = [ge.Instance(ge.OBJECT_NAMES.index(d["class"]), float(np.float32(d["score"])), tuple(float(v) for v in np.float32(d["box"])), None) for d in case["detections"]]
        objects = ge.kept_objects(dets, case["spec"]["tag"], {**ge.OPTIONS, "max_overlap": case["max_overlap"]})
        colors = lambda name, found, palette=case["palette"]: [case_colors(palette, o.box) for o in found]  # noqa: E731
        assert ge.judge(case["spec"], objects, colors) == (case["correct"], unordered_relations(case["reason"])), case


def unordered_relations(reason: str) -> str:
    """A recorded reason with its relations in POSITIONS' order: evaluate_images.py joins a set of them,
    whose order follows the recording process's string hashing."""
    def fix(line: str) -> str:
        head, sep, rest = line.partition(" target, found ")
        if not sep:
            return line
        relations = rest.removesuffix(" target").split(" and ")  # [""] where none held: "found  target"
        return f"{head}{sep}{' and '.join(r for r in ge.POSITIONS if r in relations)} target"

    return "\n".join(fix(line) for line in reason.split("\n"))


def test_instances_are_mmdetections_class_times_mask_scores_boxed_by_the_mask():
    class_logits = torch.full((2, 81), -20.0)
    class_logits[0, ge.OBJECT_NAMES.index("dog")] = 5.0
    class_logits[1, ge.OBJECT_NAMES.index("cat")] = 3.0
    masks = torch.full((2, 8, 10), -4.0)
    masks[0, 2:5, 3:7] = 2.0  # rows 2-4, columns 3-6
    masks[1, 0, 0] = 1.0
    inst = {ge.OBJECT_NAMES[i.label]: i for i in ge.instances_of(class_logits, masks, top=2)}
    p_dog = class_logits[0].softmax(-1)[ge.OBJECT_NAMES.index("dog")].item()
    assert inst["dog"].score == pytest.approx(p_dog * torch.sigmoid(torch.tensor(2.0)).item(), rel=1e-5)
    assert inst["dog"].box == (3.0, 2.0, 7.0, 5.0) and inst["dog"].mask.sum() == 12
    assert inst["cat"].box == (0.0, 0.0, 1.0, 1.0)
    assert len(ge.instances_of(class_logits, masks)) == 100 and ge.masks_to_boxes(torch.zeros(1, 4, 4, dtype=torch.bool)).tolist() == [[0, 0, 0, 0]]


def test_the_tiny_detector_runs_at_the_image_size_and_the_metric_is_nan_off_the_templates():
    metric = ge.GenEvalMask2Former("tiny")
    images = torch.rand(2, 3, 48, 64)
    (first, _) = metric.parts["detector"].detect(images)
    assert len(first) == 100 and first[0].mask.shape == (48, 64) and all(0 <= v <= 64 for i in first for v in i.box)
    scores = metric.score(images, ["a photo of a cat", "a cat on a mat"])
    assert scores[0].item() in (0.0, 1.0) and torch.isnan(scores[1])
    metric.options = {**ge.OPTIONS, "threshold": -1.0}  # every detection kept: the colour path runs
    verdicts = metric.verdicts(images, ["a photo of a red cat", "a photo of a cat"])
    assert isinstance(verdicts[0][0], bool) and verdicts[1] == (True, "")


def test_the_colour_classifier_is_clip_benchmarks_zero_shot_classifier():
    zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification", reason="clip_benchmark is installed by .ci/install-reference-packages")
    from PIL import Image

    metric = ge.GenEvalMask2Former("tiny")
    model, preprocess, tokenizer = metric.parts["clip"].loaded()
    templates = [t.replace("{obj}", "car") for t in ge.COLOR_TEMPLATES]  # evaluate_images.py: f"a photo of a {{c}} {classname}"
    theirs = zsc.zero_shot_classifier(model, tokenizer, list(ge.COLORS), templates, "cpu", amp=False)
    assert torch.allclose(metric.color_classifier("car"), theirs.float(), atol=1e-6)

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:20, 10:30] = True
    objects = [found("car", 0.9, (9.6, 4.4, 30.2, 20.0), mask), found("car", 0.8, (0, 0, 50, 40), None)]
    crops = [Image.composite(image, Image.new("RGB", image.size, "#999"), Image.fromarray(mask)).crop((9.6, 4.4, 30.2, 20.0)), image.crop((0, 0, 50, 40))]
    loader = torch.utils.data.DataLoader([(preprocess(c), 0) for c in crops], batch_size=16)
    logits, _ = zsc.run_classification(model, theirs, loader, "cpu", amp=False)
    assert metric.colors_of(image)("car", objects) == [ge.COLORS[i] for i in logits.argmax(1).tolist()]


def test_the_detector_loads_through_the_official_path_from_saved_files(tmp_path):
    from dataclasses import replace

    model, processor = ge.Mask2FormerDetector("tiny").load_tiny()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    detector = ge.Mask2FormerDetector()
    detector.info = replace(detector.info, model_id=str(tmp_path))
    _, loaded = detector.loaded()
    assert loaded.size == {"shortest_edge": 800, "longest_edge": 1333} and loaded.size_divisor == 32
    (found_,) = detector.detect(torch.rand(1, 3, 64, 64))
    assert len(found_) == 100 and found_[0].mask.shape == (64, 64)


# --------------------------------------------------------------------------- the overall score


def test_the_overall_score_is_the_mean_of_tag_means_resampled_within_tags():
    values = np.array([1, 0, 1, 1, 0, 0, 0, 1.0])  # two images a prompt
    prompts = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    tags = np.array(["a", "a", "a", "a", "b", "b", "b", "b"])
    mean, (lo, hi) = stats.macro_mean_ci(values, prompts, tags, n_boot=2000)
    assert mean == pytest.approx((3 / 4 + 1 / 4) / 2) and lo < mean < hi
    # tag a: prompts at 0.5 and 1; tag b: 0 and 0.5 -> the bootstrap's extremes are (0.5 + 0) / 2 and (1 + 0.5) / 2
    assert 0.25 <= lo and hi <= 0.75
    # each tag constant: nothing to resample, so Wilson's interval over the 4 prompts
    assert stats.macro_mean_ci([1, 1, 0, 0.0], [0, 1, 2, 3], ["a", "a", "b", "b"])[1] == pytest.approx(stats.wilson_interval(2, 4))
    # a tag with more prompts still counts once
    assert stats.macro_mean_ci([1, 0, 0, 0, 1.0], None, ["a", "a", "a", "a", "b"])[0] == pytest.approx((1 / 4 + 1) / 2)


def test_the_summary_pairs_the_overall_score_with_a_baseline_by_prompt():
    from bench.report import render_table, summarize

    tags = ["a"] * 6 + ["b"] * 2  # 3 prompts of a, 1 of b, two images each
    base = pd.DataFrame({"prompt_index": [0, 0, 1, 1, 2, 2, 3, 3], "tag": tags, "m": [0, 0, 0, 1, 1, 1, 0, 0.0]})
    run = base.assign(m=[1, 0, 1, 1, 1, 1, 1, 1.0])
    spec = {"m": {"higher_is_better": True, "version": "1", "scale": "0/1"}}
    summary = summarize(run, spec, base, group_by=["tag"], overall_by="tag")
    overall = summary["overall"]["metrics"]["m"]
    assert overall["mean"] == pytest.approx((5 / 6 + 1) / 2)
    assert overall["delta"]["value"] == pytest.approx(((0.5 + 0.5 + 0) / 3 + 1) / 2)  # per-prompt differences, meaned per tag, then over tags
    assert "overall score: the mean of the 2 tag means" in render_table(summary, "t")
    with pytest.raises(Exception, match="suite.overall_by=nope"):
        summarize(run, spec, None, overall_by="nope")
