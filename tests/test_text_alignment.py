"""LaSRO's Text Alignment Score: BERTScore equals the bert-score package, captions equal the Florence-2
model card's recipe, and the metric runs offline with its tiny scorers.

The package's numbers are recorded by tests/parity/record_bertscore.py (bert-score 0.3.13 on
transformers 4.57.6, in a separate venv) on RoBERTas rebuilt here from the same config and seed.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from bench.errors import UsageError, WeightsMissingError
from bench.metrics import _LOADED
from bench.metrics import text_alignment as ta

PARITY = json.loads((Path(__file__).parent / "data" / "bertscore_parity.json").read_text())
PROMPTS = ["a red cat on a chair", "a small boat on a river", "", "a dog " * 60, "an old house"]  # empty and over-long too


def images(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, 48, 80), generator=g, dtype=torch.uint8)  # not square: the resize matters
    return pixels.float() / 255


def unit(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_greedy_match_by_hand():
    """Candidate <s> u1 u2 </s> against reference <s> v </s>, 2-D unit vectors at known angles: special
    tokens are match targets but carry no weight, padding never matches, an empty side scores 0."""
    cand = torch.tensor([[unit(0), unit(10), unit(100), unit(180)], [unit(0), unit(60), unit(180), unit(45)]])
    cand_valid = torch.tensor([[True] * 4, [True, True, True, False]])  # pair 2: a padding slot aimed right at v
    cand_weight = torch.tensor([[False, True, True, False], [False, True, False, False]])
    ref = torch.tensor([[unit(90), unit(0), unit(200)], [unit(90), unit(45), unit(270)]])
    ref_valid = torch.ones(2, 3, dtype=torch.bool)
    ref_weight = torch.tensor([[False, True, False], [False, True, False]])
    out = ta.greedy_match(cand, cand_valid, cand_weight, ref, ref_valid, ref_weight)
    cos = lambda d: math.cos(math.radians(d))  # noqa: E731
    # pair 1: u1 (10 deg) best matches v (0): cos 10; u2 (100) best matches the reference's <s> (90): cos 10;
    # v (0) best matches the candidate's <s> (0): 1.
    p1, r1 = cos(10), 1.0
    # pair 2: u (60) best matches v (45): cos 15; v's best real match is u (cos 15), not the padding (45: 1).
    p2, r2 = cos(15), cos(15)
    expected = {"precision": [p1, p2], "recall": [r1, r2], "f1": [2 * p1 * r1 / (p1 + r1), 2 * p2 * r2 / (p2 + r2)]}
    for key, values in expected.items():
        assert torch.allclose(out[key].double(), torch.tensor(values, dtype=torch.float64), atol=1e-6), (key, out[key])
    # a side made only of special tokens (an empty sentence) scores 0 on every variant
    no_words = torch.zeros(1, 4, dtype=torch.bool)
    empty = ta.greedy_match(cand[:1], cand_valid[:1], no_words, ref[:1], ref_valid[:1], ref_weight[:1])
    assert all(float(v) == 0.0 for v in empty.values())


def saved_roberta(folder: Path, case: dict):
    """The recorded case's RoBERTa, rebuilt from its config and seed and saved with the tiny tokenizer:
    the folder the recording script handed to ``bert_score.score(model_type=FOLDER)``."""
    from transformers import RobertaConfig, RobertaModel

    ta.byte_bpe_files(folder, config={"tokenizer_class": "RobertaTokenizer", "model_max_length": case["model_max_length"]})
    vocab = len(json.loads((folder / "vocab.json").read_text()))
    ta.seeded_weights(RobertaModel(RobertaConfig(**{"vocab_size": vocab, **case["config"]})), case["seed"]).save_pretrained(folder)
    return folder


def check_parity(case: dict, folder: Path):
    scorer = ta.load_bertscore(str(folder), case["layer"], ta.BASELINE_ROBERTA_LARGE_L17)  # the metric's loading path
    ours = scorer(case["candidates"], case["references"])
    rescaled = scorer(case["candidates"], case["references"], rescale=True)
    for key in ("precision", "recall", "f1"):
        for recorded in ("per_pair", "batched"):  # one pair per call, and the package's default batching
            assert torch.allclose(ours[key], torch.tensor(case[recorded][key], dtype=torch.float64), atol=1e-5, rtol=0), (key, recorded, ours[key])
        assert torch.allclose(rescaled[key], torch.tensor(case["rescaled"][key], dtype=torch.float64), atol=1e-5, rtol=0), (key, rescaled[key])
    assert ours["f1"].std() > 0.1 and float(ours["f1"][2]) == pytest.approx(1.0, abs=1e-6)  # varied, and identity scores 1
    return scorer


def test_bertscore_equals_the_bert_score_package_on_the_tiny_roberta(tmp_path):
    case = PARITY["tiny"]
    assert case["config"] == ta.TINY_ROBERTA and case["layer"] == ta.TINY_ROBERTA_LAYER and case["seed"] == ta.TINY_SEED
    assert case["baseline_l17"] == ta.BASELINE_ROBERTA_LARGE_L17  # the constants are the package's roberta-large.tsv row 17
    scorer = check_parity(case, saved_roberta(tmp_path, case))
    assert scorer.max_length == 64 and len(scorer.token_ids(case["candidates"][-1])) == 64  # "a tree " * 40 is truncated
    # scorers=tiny carries the very same BERTScore model
    tiny = ta.TextAlignment("tiny").loaded()[2]
    assert torch.equal(tiny(case["candidates"], case["references"])["f1"], scorer(case["candidates"], case["references"])["f1"])


@pytest.mark.slow
def test_bertscore_equals_the_bert_score_package_on_the_roberta_large_architecture(tmp_path):
    """roberta-large's architecture (24 layers of 1024, layer 17, 512 tokens), seeded random weights saved
    as the hub's folder would be: about 1.4 GB written and read back."""
    import gc

    case = PARITY["roberta-large"]
    assert case["layer"] == ta.BERT_LAYER and case["config"]["hidden_size"] == 1024 and case["config"]["num_hidden_layers"] == 24
    scorer = check_parity(case, saved_roberta(tmp_path, case))
    assert scorer.max_length == 512 and len(scorer.token_ids(case["candidates"][-1])) == 512
    del scorer
    gc.collect()


def test_captions_equal_the_model_card_recipe_one_image_at_a_time():
    """Florence-2's model card: processor(text=task, images=image), generate(input_ids, pixel_values,
    num_beams=3, do_sample=False), decode with special tokens, post_process_generation. The metric does
    the whole batch in one generate call."""
    metric = ta.TextAlignment("tiny")
    model, processor, _ = metric.loaded()
    tensors = images()
    from bench.metrics.clip import to_pil

    expected = []
    for image in to_pil(tensors):
        inputs = processor(text=metric.task, images=image, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=metric.max_new_tokens, do_sample=False, num_beams=3)
        text = processor.batch_decode(ids, skip_special_tokens=False)[0]
        expected.append(processor.post_process_generation(text, task=metric.task, image_size=(image.width, image.height))[metric.task])
    captions = metric.caption(tensors)
    assert captions == expected
    assert len(set(captions)) > 1 and all("<pad>" not in c and "</s>" not in c for c in captions)


def test_tiny_scorer_end_to_end_is_bertscore_of_its_captions_deterministic_and_labelled():
    _LOADED.clear()
    metric = ta.TextAlignment("tiny")
    tensors = images()
    scores = metric.score(tensors, PROMPTS)
    assert scores.dtype == torch.float64 and scores.shape == (5,)
    bert = metric.loaded()[2]
    assert torch.equal(scores, bert(metric.caption(tensors), PROMPTS)["f1"])  # caption is the candidate, prompt the reference
    assert float(scores[2]) == 0.0 and scores.std() > 0.01  # the empty prompt scores 0; the others differ
    _LOADED.clear()  # rebuilt from scratch: the same seeded weights, the same numbers
    assert torch.equal(ta.TextAlignment("tiny").score(tensors, PROMPTS), scores)
    info = metric.info
    assert info.name == "text_alignment" and info.version == "1+tiny-random" and info.model_id == "tiny-random" and "NOT MEANINGFUL" in info.scale


def test_scores_do_not_depend_on_the_batch_size():
    metric = ta.TextAlignment("tiny")
    tensors = images(seed=3)
    whole = metric.score(tensors, PROMPTS)
    single = torch.cat([metric.score(tensors[i : i + 1], PROMPTS[i : i + 1]) for i in range(5)])
    split = torch.cat([metric.score(tensors[:2], PROMPTS[:2]), metric.score(tensors[2:], PROMPTS[2:])])
    assert torch.allclose(whole, single, atol=1e-6, rtol=0) and torch.allclose(whole, split, atol=1e-6, rtol=0)


def test_options_the_paper_leaves_open_are_explicit_and_versioned():
    default = ta.TextAlignment()
    assert default.info.version == "1" and default.info.model_id == "florence-community/Florence-2-large"
    assert default.task == "<DETAILED_CAPTION>" and default.variant == "f1" and default.rescale is False
    for words in ("BERTScore F1", "roberta-large layer 17", "no rescaling", "Florence-2-large <DETAILED_CAPTION>"):
        assert words in default.info.scale
    recall = ta.TextAlignment(size="base", task="<MORE_DETAILED_CAPTION>", variant="recall", rescale=True)
    assert recall.info.version == "1-florence-2-base-more_detailed_caption-recall-rescaled"
    assert recall.info.model_id == "florence-community/Florence-2-base" and "BERTScore recall" in recall.info.scale
    assert recall.backbone() != default.backbone() and ta.TextAlignment(variant="precision").backbone() == default.backbone()
    for bad, word in ((dict(size="huge"), "size"), (dict(task="<OD>"), "caption task"), (dict(variant="f2"), "variant")):
        with pytest.raises(UsageError, match=word):
            ta.TextAlignment(**bad)
    # the variants of one tiny model: the same captions, another component of the same BERTScore
    tensors = images(n=3, seed=4)
    metric = ta.TextAlignment("tiny", variant="recall", rescale=True)
    expected = metric.loaded()[2](metric.caption(tensors), PROMPTS[:3], rescale=True)["recall"]
    assert torch.equal(metric.score(tensors, PROMPTS[:3]), expected)
    with pytest.raises(UsageError, match="2 prompts for 3 images"):
        metric.score(tensors, PROMPTS[:2])


def test_official_loading_path_on_saved_tiny_weights(tmp_path):
    """The hub loading code (Florence2ForConditionalGeneration, AutoProcessor with the PIL backend,
    AutoModel/AutoTokenizer for BERTScore) on folders holding the tiny models: the scores of scorers=tiny."""
    captioner, processor = ta.tiny_florence()
    captioner.save_pretrained(tmp_path / "florence")
    processor.save_pretrained(tmp_path / "florence")
    saved_roberta(tmp_path / "roberta", PARITY["tiny"])

    class Local(ta.TextAlignment):
        florence_repos = {"large": str(tmp_path / "florence")}
        bert_repo, bert_layer = str(tmp_path / "roberta"), ta.TINY_ROBERTA_LAYER

    local = Local()
    local.max_new_tokens = ta.TINY_MAX_NEW_TOKENS
    tensors = images(n=3, seed=5)
    assert torch.allclose(local.score(tensors, PROMPTS[:3]), ta.TextAlignment("tiny").score(tensors, PROMPTS[:3]), atol=1e-6, rtol=0)
    assert type(local.loaded()[1].image_processor).__name__ == "CLIPImageProcessorPil"


def test_missing_weights_offline_is_one_line_naming_both_repos_and_prefetch():
    with pytest.raises(WeightsMissingError) as err:
        ta.TextAlignment().score(images(n=1), ["a cat"])
    message = str(err.value)
    assert "\n" not in message and "bench prefetch metrics=text_alignment" in message and "scorers=tiny" in message
    assert "florence-community/Florence-2-large" in message and "FacebookAI/roberta-large" in message


def test_registered_and_named_by_the_lasro_text_alignment_preset():
    from bench.config import compose, to_dict
    from bench.scoring import make_metric

    method = to_dict(compose(["method=lasro-ssd1b-lcm-text-alignment"]))["method"]
    assert method["reward"] == "text_alignment"
    metric = make_metric("text_alignment", "tiny")
    assert isinstance(metric, ta.TextAlignment) and metric.differentiable is False
    assert [f.repo for f in metric.hub_files] == ["florence-community/Florence-2-large", "FacebookAI/roberta-large"]
