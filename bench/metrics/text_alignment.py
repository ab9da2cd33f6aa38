"""LaSRO's Text Alignment Score: caption the image with Florence-2, then BERTScore the caption against the prompt.

LaSRO (Jia et al., CVPR 2025, App. D), "inspired by DDPO": Florence-2 captions the image ("capture the
detailed text description") and BERTScore compares that caption with the original prompt. The paper
fixes neither the Florence-2 size, nor the caption task, nor the BERTScore model or variant. Each is an
option of :class:`TextAlignment`; the defaults and why:

* captioner ``size="large"``: Florence-2-large (0.77B), the stronger of the two public sizes, as the
  transformers-native conversion ``florence-community/Florence-2-large`` (``microsoft/Florence-2-large``
  holds the remote-code checkpoint, whose state-dict layout transformers' own
  ``Florence2ForConditionalGeneration`` does not load);
* ``task="<DETAILED_CAPTION>"``: the paper's words "detailed text description" name this task
  ("Describe in detail what is shown in the image."); ``<MORE_DETAILED_CAPTION>`` writes a paragraph,
  several times longer than a prompt, which BERTScore's precision side punishes;
* decoding as the model card's example: beam search with 3 beams, ``max_new_tokens=1024``,
  ``do_sample=False`` (the rest from the checkpoint's generation config), then the processor's own
  post-processing of the decoded text;
* BERTScore as the ``bert-score`` package computes it for English by default: ``roberta-large``,
  layer 17, no idf, the caption as the candidate and the prompt as the reference; ``variant="f1"``
  (the package's headline number; DDPO's LLaVA reward used the recall, on
  microsoft/deberta-xlarge-mnli; "recall" and "precision" are there too) and ``rescale=False`` (the package's default; ``True`` applies its published
  roberta-large layer-17 baseline).

The score is not differentiable (the caption is decoded text). Captions are batched (one
``generate`` call per batch of images), the captioner runs in float16 on GPU as in the model card and
BERTScore always in float32.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from bench.errors import UsageError
from bench.io import scratch_dir
from bench.metrics import HubFiles, LearnedMetric, MetricInfo

FLORENCE_REPOS = {"large": "florence-community/Florence-2-large", "base": "florence-community/Florence-2-base"}
# Commits of the florence-community conversions (not microsoft/Florence-2-*, the remote-code checkpoints), each the
# snapshot or pinned revision of several public projects: large with model.safetensors sha256 7715423d..., base 62f3e696...
FLORENCE_REVISIONS: dict[str, str] = {"large": "4271c66b88cdbc05735372ec13b2360108de5317", "base": "00921df66db728a9ceb750f5eca43e5c203a2051"}
CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
NUM_BEAMS, MAX_NEW_TOKENS = 3, 1024  # the Florence-2 model card's generate() arguments

BERT_REPO = "FacebookAI/roberta-large"  # bert-score's lang2model["en"] ("roberta-large", now under FacebookAI/)
BERT_REVISION = "722cf37b1afa9454edce342e7895e588b6ff1d59"  # HF main history "(#6)" and ~10 snapshot paths (one lists model.safetensors)
BERT_LAYER = 17  # bert-score's model2layers["roberta-large"]
# bert-score's bert_score/rescale_baseline/en/roberta-large.tsv, row LAYER=17: the P, R and F baselines.
BASELINE_ROBERTA_LARGE_L17 = {"precision": 0.83150584, "recall": 0.8314941, "f1": 0.83122575}
VARIANTS = ("f1", "precision", "recall")


# --------------------------------------------------------------------------- BERTScore


def greedy_match(cand: torch.Tensor, cand_valid: torch.Tensor, cand_weight: torch.Tensor,
                 ref: torch.Tensor, ref_valid: torch.Tensor, ref_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """BERTScore's greedy matching of L2-normalized token embeddings ``(N, L, D)``.

    Every candidate token takes its best cosine among the reference's tokens (precision) and every
    reference token its best among the candidate's (recall), special tokens included as match
    targets; the weighted mean then skips them (``*_weight`` is 0 on ``<s>``/``</s>`` and padding,
    as the package's idf dict without idf). ``*_valid`` marks real tokens: padding never matches, so
    a pair scores the same in any batch. A pair with an empty side scores 0, as in the package.
    """
    sim = cand @ ref.transpose(1, 2)
    best_for_cand = sim.masked_fill(~ref_valid[:, None, :], float("-inf")).amax(2)
    best_for_ref = sim.masked_fill(~cand_valid[:, :, None], float("-inf")).amax(1)
    cw, rw = cand_weight.to(sim.dtype), ref_weight.to(sim.dtype)
    empty = (cw.sum(1) == 0) | (rw.sum(1) == 0)
    precision = (best_for_cand.masked_fill(cw == 0, 0) * cw).sum(1) / cw.sum(1).clamp_min(1)
    recall = (best_for_ref.masked_fill(rw == 0, 0) * rw).sum(1) / rw.sum(1).clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall)
    f1 = torch.where(torch.isnan(f1), torch.zeros_like(f1), f1)
    zero = torch.zeros_like(precision)
    return {"precision": torch.where(empty, zero, precision), "recall": torch.where(empty, zero, recall), "f1": torch.where(empty, zero, f1)}


class BertScore:
    """BERTScore (Zhang et al., 2020) equal to ``bert_score.score`` (package 0.3.13 on transformers 4)
    with ``idf=False``: each sentence stripped, encoded with a leading space (the package's
    ``add_prefix_space=True`` for RoBERTa) and truncated to the model's length, the hidden states of
    layer ``num_layers`` (the package drops the layers above it), then :func:`greedy_match`.

    A plain object, not a module, so that ``LearnedMetric`` leaves it in float32 on GPU.
    """

    def __init__(self, model, tokenizer, num_layers: int, baseline: dict[str, float] | None = None):
        if not 0 <= num_layers <= len(model.encoder.layer):
            raise UsageError(f"BERTScore layer {num_layers} is not in 0..{len(model.encoder.layer)} for this model")
        model.encoder.layer = model.encoder.layer[:num_layers]
        self.model, self.tokenizer, self.num_layers, self.baseline = model.float().eval(), tokenizer, num_layers, baseline
        # RoBERTa's positions start after the padding index: 514 positions hold 512 tokens.
        positions = model.config.max_position_embeddings - model.config.pad_token_id - 1
        self.max_length = min(int(tokenizer.model_max_length), positions)
        self.special = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id])

    def to(self, device) -> "BertScore":
        self.model.to(device, torch.float32)
        return self

    def token_ids(self, sentence: str) -> list[int]:
        sentence = sentence.strip()
        if not sentence:
            return [self.tokenizer.cls_token_id, self.tokenizer.sep_token_id]
        return self.tokenizer(" " + sentence, add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]

    def embed(self, sentences: Sequence[str]):
        """Normalized layer embeddings ``(N, L, D)``, the real-token mask and the averaging weights."""
        ids = [self.token_ids(s) for s in sentences]
        length = max(len(i) for i in ids)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        valid = torch.zeros(len(ids), length, dtype=torch.bool)
        for row, i in enumerate(ids):
            input_ids[row, : len(i)] = torch.tensor(i)
            valid[row, : len(i)] = True
        with torch.no_grad():
            hidden = self.model(input_ids=input_ids.to(device), attention_mask=valid.long().to(device)).last_hidden_state.float()
        hidden = hidden / hidden.norm(dim=-1, keepdim=True)
        weight = valid & ~torch.isin(input_ids, self.special)
        return hidden, valid.to(device), weight.to(device)

    def __call__(self, candidates: Sequence[str], references: Sequence[str], rescale: bool = False) -> dict[str, torch.Tensor]:
        if len(candidates) != len(references):
            raise UsageError(f"BERTScore: {len(candidates)} candidates for {len(references)} references")
        scores = greedy_match(*self.embed(candidates), *self.embed(references))
        if rescale:
            if self.baseline is None:
                raise UsageError("BERTScore: no rescale baseline is known for this model and layer")
            scores = {k: (v - self.baseline[k]) / (1 - self.baseline[k]) for k, v in scores.items()}
        return {k: v.double().cpu() for k, v in scores.items()}


def load_bertscore(repo: str = BERT_REPO, layer: int = BERT_LAYER, baseline: dict[str, float] | None = BASELINE_ROBERTA_LARGE_L17, **hub_kwargs) -> BertScore:
    """BERTScore on a hub model or folder (bert-score's ``get_model``/``get_tokenizer``: ``AutoModel``, ``AutoTokenizer``)."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(repo, dtype=torch.float32, **hub_kwargs)
    return BertScore(model, AutoTokenizer.from_pretrained(repo, **hub_kwargs), layer, baseline)


# --------------------------------------------------------------------------- tiny offline models

TINY_WORDS = (
    "red blue green yellow white black small large old new bright dark cat dog tree house car boat bird "
    "flower mountain river city street cup apple book chair lamp cloud sun moon painting photo of a an the on in "
    "image shows picture with and is describe detail what shown paragraph does"
).split()
BPE_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # RoBERTa's and BART's ids 0-3


def byte_bpe_files(directory: Path, words: Sequence[str] = TINY_WORDS, extra_tokens: Sequence[str] = (), config: dict | None = None) -> Path:
    """A small byte-level BPE vocabulary of RoBERTa's layout (vocab.json, merges.txt), built offline.

    The 256 byte symbols follow the four specials, then one merge chain per word with its leading
    space (``Ġcat``); ``<mask>`` and ``extra_tokens`` come last. Any text encodes (bytes are the
    fallback); the listed words become one token each.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbol = bytes_to_unicode()
    vocab = list(BPE_SPECIALS) + [byte_symbol[b] for b in range(256)]
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = [byte_symbol[b] for b in (" " + word).encode()]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            if merged not in vocab:
                vocab.append(merged)
    vocab += ["<mask>", *extra_tokens]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(config or {}))
    return directory


def seeded_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter from one seeded generator, in sorted-name order, independently of
    the library's own initialization (so transformers 4 and 5 build the same weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1:
                value = 1 + 0.1 * noise if name.endswith(("LayerNorm.weight", "layer_norm.weight", "norm.weight")) else 0.1 * noise
            else:
                value = noise / p.shape[-1] ** 0.5
            p.copy_(value.to(p.dtype))
    return model


TINY_ROBERTA = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, max_position_embeddings=66,
    type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
TINY_ROBERTA_LAYER, TINY_SEED = 3, 0


@lru_cache(maxsize=1)
def tiny_roberta_tokenizer_dir() -> Path:
    return byte_bpe_files(scratch_dir("bench-tiny-roberta-"), config={"tokenizer_class": "RobertaTokenizer", "model_max_length": 64})


def tiny_roberta(seed: int = TINY_SEED):
    """The tiny RoBERTa of ``scorers=tiny`` (and of the recorded BERTScore parity), with its tokenizer."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    tokenizer = RobertaTokenizer.from_pretrained(tiny_roberta_tokenizer_dir())
    config = RobertaConfig(vocab_size=len(tokenizer), **TINY_ROBERTA)
    return seeded_weights(RobertaModel(config), seed), tokenizer


TINY_FLORENCE_VISION = dict(depths=[1, 1, 1, 1], embed_dim=[16, 32, 32, 32], num_heads=[2, 2, 2, 2], num_groups=[2, 2, 2, 2], window_size=4, projection_dim=32, drop_path_rate=0.0)
TINY_FLORENCE_TEXT = dict(
    model_type="bart", d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
    decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
)
TINY_IMAGE_SIZE, TINY_MAX_NEW_TOKENS = 64, 12  # 64 px: a 2x2 DaViT grid, 5 image tokens; short captions keep smoke runs fast


@lru_cache(maxsize=1)
def tiny_florence_tokenizer_dir() -> Path:
    """Florence-2's tokenizer layout (BART's byte-level BPE plus the ``<image>`` token), tiny."""
    config = {"tokenizer_class": "BartTokenizer", "model_max_length": 1024, "extra_special_tokens": {"image_token": "<image>"}}
    return byte_bpe_files(scratch_dir("bench-tiny-florence-"), extra_tokens=["<image>"], config=config)


def tiny_florence(seed: int = TINY_SEED):
    """A seeded random Florence-2 (DaViT + BART, the real classes) and its processor, built offline."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    tokenizer = AutoTokenizer.from_pretrained(tiny_florence_tokenizer_dir())
    image_processor = CLIPImageProcessorPil(  # Florence-2's preprocessing (resize to a square, ImageNet statistics), smaller
        do_resize=True, size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, resample=3, do_center_crop=False, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        image_seq_length=(TINY_IMAGE_SIZE // 32) ** 2 + 1,
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer, post_processor_config={"pure_text": {}})
    config = Florence2Config(text_config={**TINY_FLORENCE_TEXT, "vocab_size": len(tokenizer)}, vision_config=TINY_FLORENCE_VISION, image_token_id=tokenizer.image_token_id)
    model = seeded_weights(Florence2ForConditionalGeneration(config), seed)
    # BART's decoding defaults, which Florence-2's text config carries over
    model.generation_config.update(forced_bos_token_id=0, forced_eos_token_id=2, no_repeat_ngram_size=3, num_beams=NUM_BEAMS, early_stopping=True)
    return model, processor


# --------------------------------------------------------------------------- the metric

DEFAULTS = {"size": "large", "task": "<DETAILED_CAPTION>", "variant": "f1", "rescale": False}


def metric_info(size: str, task: str, variant: str, rescale: bool, florence_repo: str, bert_repo: str, bert_layer: int) -> MetricInfo:
    """The identity of one choice of options: version "1" for the defaults, the options spelled out otherwise."""
    options = {"size": size, "task": task, "variant": variant, "rescale": rescale}
    version = "1" if options == DEFAULTS else "1-" + "-".join([f"florence-2-{size}", task.strip("<>").lower(), variant] + (["rescaled"] if rescale else []))
    name = {"f1": "F1", "precision": "precision", "recall": "recall"}[variant]
    scale = (
        f"BERTScore {name} ({bert_repo.split('/')[-1]} layer {bert_layer}, no idf, {'rescaled with its baseline' if rescale else 'no rescaling'}) "
        f"of the Florence-2-{size} {task} caption vs the prompt, "
        + ("rescaled: unrelated texts near 0, identical 1, can be negative" if rescale else "in about [0, 1]: unrelated texts near 0.83, identical 1")
    )
    return MetricInfo("text_alignment", version, True, scale, florence_repo)


class TextAlignment(LearnedMetric):
    """LaSRO's Text Alignment Score: BERTScore between the Florence-2 caption of the image and the prompt.

    The paper fixes none of the captioner size, the caption task or the BERTScore variant; each is a
    constructor option (module docstring: defaults and reasons): ``size`` ("large" | "base"), ``task``
    (``<CAPTION>`` | ``<DETAILED_CAPTION>`` | ``<MORE_DETAILED_CAPTION>``), ``variant`` ("f1" |
    "precision" | "recall") and ``rescale`` (bert-score's roberta-large layer-17 baseline). A choice other
    than the defaults is another version of the metric. Not differentiable: it can be a black-box reward
    (LaSRO, DDPO), not a back-propagated one.
    """

    florence_repos, florence_revisions = FLORENCE_REPOS, FLORENCE_REVISIONS
    bert_repo, bert_revision, bert_layer, bert_baseline = BERT_REPO, BERT_REVISION, BERT_LAYER, BASELINE_ROBERTA_LARGE_L17
    info = metric_info(*DEFAULTS.values(), FLORENCE_REPOS["large"], BERT_REPO, BERT_LAYER)  # the default's; each instance sets its own

    def __init__(self, scorers: str = "official", size: str = DEFAULTS["size"], task: str = DEFAULTS["task"], variant: str = DEFAULTS["variant"], rescale: bool = DEFAULTS["rescale"]):
        if size not in self.florence_repos:
            raise UsageError(f"text_alignment: unknown Florence-2 size {size!r}: use {' or '.join(self.florence_repos)}")
        if task not in CAPTION_TASKS:
            raise UsageError(f"text_alignment: unknown caption task {task!r}: use one of {', '.join(CAPTION_TASKS)}")
        if variant not in VARIANTS:
            raise UsageError(f"text_alignment: unknown BERTScore variant {variant!r}: use one of {', '.join(VARIANTS)}")
        self.size, self.task, self.variant, self.rescale = size, task, variant, bool(rescale)
        self.florence_repo = self.florence_repos[size]
        self.info = metric_info(size, task, variant, self.rescale, self.florence_repo, self.bert_repo, self.bert_layer)
        self.weight_files = (
            f"{self.florence_repo} (config.json, model.safetensors, processor and tokenizer files) and "
            f"{self.bert_repo} (config.json, model.safetensors, vocab.json, merges.txt)"
        )
        self.hub_files = (
            HubFiles(self.florence_repo, self.florence_revisions.get(size), ("*.json", "*.safetensors", "*.txt")),
            HubFiles(self.bert_repo, self.bert_revision, ("*.json", "model.safetensors", "*.txt")),
        )
        self.max_new_tokens = TINY_MAX_NEW_TOKENS if scorers == "tiny" else MAX_NEW_TOKENS
        super().__init__(scorers)

    def backbone(self) -> tuple:
        return ("text_alignment", self.florence_repo, self.bert_repo, self.bert_layer)  # the options share the loaded models

    def load_official(self):
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        florence = self.hub_kwargs(self.florence_repo)
        captioner = Florence2ForConditionalGeneration.from_pretrained(self.florence_repo, **florence)
        processor = AutoProcessor.from_pretrained(self.florence_repo, backend="pil", **florence)  # PIL resize, as transformers 4 did
        return captioner, processor, load_bertscore(self.bert_repo, self.bert_layer, self.bert_baseline, **self.hub_kwargs(self.bert_repo)).to(self.device)

    def load_tiny(self):
        captioner, processor = tiny_florence()
        bert, tokenizer = tiny_roberta()
        return captioner, processor, BertScore(bert, tokenizer, TINY_ROBERTA_LAYER, self.bert_baseline).to(self.device)

    def caption(self, images: torch.Tensor) -> list[str]:
        """Florence-2 captions of a batch of images, in one ``generate`` call: the model card's recipe
        (3 beams, no sampling) and its post-processing of the decoded text, padding removed."""
        from bench.metrics.clip import to_pil

        captioner, processor, _ = self.loaded()
        pils = to_pil(images)
        inputs = processor(text=[self.task] * len(pils), images=pils, return_tensors="pt")
        with torch.no_grad():
            ids = captioner.generate(
                input_ids=inputs["input_ids"].to(self.device), pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                max_new_tokens=self.max_new_tokens, num_beams=NUM_BEAMS, do_sample=False,
            )
        pad = processor.tokenizer.pad_token
        texts = processor.batch_decode(ids, skip_special_tokens=False)
        return [processor.post_process_generation(t.replace(pad, ""), task=self.task, image_size=im.size)[self.task] for t, im in zip(texts, pils)]

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise UsageError(f"text_alignment: {len(prompts)} prompts for {images.shape[0]} images")
        bert = self.loaded()[2]
        return bert(self.caption(images), list(prompts), rescale=self.rescale)[self.variant]
