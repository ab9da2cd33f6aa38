"""BLIP-VQA metrics: T2I-CompBench's attribute-binding score and LaSRO's yes/no accuracy.

T2I-CompBench (``BLIPvqa_eval/BLIP_vqa.py`` with the Salesforce BLIP code it vendors) asks BLIP-VQA
``model_base_vqa_capfilt_large.pth`` at 480x480 one question per spaCy noun chunk of the prompt
(the chunk's text and "?", the first ``np_num = 8`` chunks) and scores an image by the product of
its answers' P(yes). P(yes) is its ``vqa_prob`` inference: the text decoder's first-token
distribution after ``[DEC]``, renormalized over the two tokens "yes" (2748) and "no" (2053):
``p(yes) / (p(yes) + p(no))``. Each answer is written with 4 decimals before the product and the
product again with 4 decimals; both roundings are kept so the numbers equal the official files.

The weights are the official checkpoint itself (Salesforce's BLIP storage, the file the official
config names), converted at load time into transformers' ``BlipForQuestionAnswering`` modules at
image size 480 with BLIP's ViT LayerNorm epsilon 1e-6. The hub's ``Salesforce/blip-vqa-capfilt-large``
is the same checkpoint with its position embeddings interpolated to 384, so it cannot give the
480-pixel numbers. The forward pass is the official one, not transformers' ``generate``: the
question's first token is ``[ENC]`` and the decoder attends to the question's padding mask.

Images and (image, question) pairs are batched: the ViT runs once per image, the text encoder and
decoder once per batch of questions of one token count (see :meth:`BlipVqa.p_yes`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

import torch

from bench.io import load_torch, scratch_dir
from bench.metrics import HubFiles, LearnedMetric, MetricInfo, seeded
from bench.metrics.clip import CLIP_MEAN, CLIP_STD, preprocess_each, to_pil
from bench.metrics.imagereward import BERT_TOKENIZER, BERT_TOKENIZER_REVISION, blip_tokenizer, write_wordpiece_vocab  # BLIP's tokenizer, as ImageReward's

BLIP_VQA_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_vqa_capfilt_large.pth"
# No sha256 of this file is published (BLIP's README, LAVIS and T2I-CompBench only link it) and no copy
# could be hashed here: downloading it needs BENCH_ALLOW_UNPINNED=1, which logs its sha256 to pin here.
BLIP_VQA_SHA256: str | None = None
IMAGE_SIZE = 480
MAX_QUESTION_TOKENS = 35
NP_NUM = 8  # BLIP_vqa.py --np_num: questions about the first 8 noun chunks at most


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's question normalization: lower case, drop ``.!"()*#:;~``, strip trailing spaces, 50 words."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def round4(x: float) -> float:
    """The official files' ``'{:.4f}'.format`` of a float32 value."""
    return float(f"{x:.4f}")


def product_score(p_yes: Sequence[float]) -> float:
    """T2I-CompBench's per-image BLIP-VQA score: the float32 product of the 4-decimal answers, to 4
    decimals (1.0 for a prompt without noun chunks)."""
    product = torch.tensor(1.0, dtype=torch.float32)
    for p in p_yes:
        product = product * torch.tensor(round4(p), dtype=torch.float32)
    return round4(product.item())


def load_checkpoint(path) -> dict:
    """BLIP's ``.pth`` through the weights-only unpickler (``bench.io.load_torch``). BLIP's train_vqa.py
    saves the model and optimizer state dicts, its YAML config as plain dicts, lists and strings, and the
    epoch: nothing the weights-only unpickler refuses (tests/test_t2i_compbench.py saves that layout),
    so a checkpoint pickling any class is refused in one line, never unpickled."""
    return load_torch(path)


def blip_state_dict(checkpoint: dict) -> dict:
    """A BLIP/LAVIS ``blip_vqa`` state dict (``{"model": ...}``) with transformers' BLIP key names:
    the ViT keys are renamed (as transformers' BLIP conversion script does), the BERT keys match."""
    renames = [
        (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
        (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
        (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
        (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
        (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
        (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
        (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
        (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
        (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    ]
    out = {}
    for key, value in checkpoint.get("model", checkpoint).items():
        if key.endswith("position_ids"):
            continue
        for pattern, new in renames:
            key = re.sub(pattern, new, key)
        out[key] = value
    return out


def blip_vqa_config(vision: dict | None = None, text: dict | None = None):
    """BLIP ViT-B/16 at 480 with BERT-base (BLIP's ``med_config.json``), or smaller parts for tests."""
    from transformers import BlipConfig

    vision = {"image_size": IMAGE_SIZE, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "layer_norm_eps": 1e-6, **(vision or {})}
    text = {"vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": vision["hidden_size"], "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512, "layer_norm_eps": 1e-12,
            "bos_token_id": 30522, "pad_token_id": 0, "sep_token_id": 102, **(text or {})}
    return BlipConfig(vision_config=vision, text_config=text)


class BlipVqa(LearnedMetric):
    """T2I-CompBench's BLIP-VQA score (color, shape, texture; the attribute part of complex)."""

    info = MetricInfo(
        name="blip-vqa", version="t2i-compbench-1", higher_is_better=True,
        scale="product over the prompt's noun chunks of BLIP-VQA P(yes) = p(yes)/(p(yes)+p(no)), in [0, 1]",
        model_id="Salesforce BLIP model_base_vqa_capfilt_large.pth (image 480)",
    )
    weight_files = f"model_base_vqa_capfilt_large.pth ({BLIP_VQA_URL}) and the {BERT_TOKENIZER} tokenizer"
    hub_files = (HubFiles(BERT_TOKENIZER, BERT_TOKENIZER_REVISION, ("vocab.txt", "tokenizer_config.json", "config.json")),)
    checkpoint_url = BLIP_VQA_URL
    checkpoint_sha256 = BLIP_VQA_SHA256
    tokenizer_id = BERT_TOKENIZER

    def backbone(self) -> tuple:
        return ("blip-vqa", self.checkpoint_url)  # blip-vqa and attribute_binding share one model

    def load_official(self):
        from transformers import BlipForQuestionAnswering

        tokenizer = blip_tokenizer(self.tokenizer_id, **self.hub_kwargs(self.tokenizer_id))
        ids = (tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("[ENC]"), *tokenizer.convert_tokens_to_ids(["yes", "no"]))
        if ids != (30522, 30523, 2748, 2053):  # the ids T2I-CompBench's vqa_prob hard-codes
            raise ValueError(f"{self.tokenizer_id} is not bert-base-uncased's vocabulary ([DEC], [ENC], yes, no = {ids})")
        path = self.url_weights(self.checkpoint_url, self.checkpoint_sha256)
        model = BlipForQuestionAnswering(blip_vqa_config())
        state = blip_state_dict(load_checkpoint(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise RuntimeError(f"{path} is not a BLIP blip_vqa checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model, tokenizer

    def load_tiny(self):
        from transformers import BlipForQuestionAnswering

        tokenizer = blip_tokenizer(str(write_wordpiece_vocab(scratch_dir("bench-blip-vocab-"), extra=("yes", "no"))))
        config = blip_vqa_config(
            vision=dict(image_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
            text=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id),
        )
        with seeded():
            model = BlipForQuestionAnswering(config)
        return model, tokenizer

    def download(self) -> list[str]:
        from bench.metrics.nlp import download_spacy

        return super().download() + [str(self.url_weights(self.checkpoint_url, self.checkpoint_sha256)), download_spacy()]

    def parser(self):
        from bench.metrics.nlp import english

        return english(self.scorers, self.name)

    def transform(self, size: int):
        """BLIP's test transform: bicubic resize to size x size, to tensor, CLIP normalization."""
        from torchvision import transforms
        from torchvision.transforms.functional import InterpolationMode

        return transforms.Compose([transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC), transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])

    @torch.no_grad()
    def p_yes(self, images: torch.Tensor, questions: Sequence[str], owners: Sequence[int], batch_size: int = 64) -> torch.Tensor:
        """``vqa_prob`` of every (image ``owners[k]``, ``questions[k]``) pair, float32 ``(len(questions),)``.

        Questions are batched by token count, so no batch holds padding: transformers' BLIP text
        cross-attention ignores ``encoder_attention_mask`` (5.x passes it under another name), and the
        decoder would attend to the padded question positions that BLIP masks out."""
        model, tokenizer = self.loaded()
        if not questions:
            return torch.zeros(0)
        transform = self.transform(model.config.vision_config.image_size)
        pixels = preprocess_each(transform, to_pil(images)).to(self.device, self.dtype)
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
        enc_id = tokenizer.convert_tokens_to_ids("[ENC]")
        ids = tokenizer([pre_question(q) for q in questions], truncation=True, max_length=MAX_QUESTION_TOKENS).input_ids
        by_length: dict[int, list[int]] = {}
        for k, row in enumerate(ids):
            by_length.setdefault(len(row), []).append(k)
        out = torch.zeros(len(questions))
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                rows = group[start : start + batch_size]
                tokens = torch.tensor([ids[k] for k in rows], device=self.device)
                tokens[:, 0] = enc_id
                states = image_embeds[torch.as_tensor([owners[k] for k in rows], device=self.device)]
                question = model.text_encoder(input_ids=tokens, attention_mask=torch.ones_like(tokens), encoder_hidden_states=states, return_dict=True).last_hidden_state
                start_ids = torch.full((len(rows), 1), tokenizer.bos_token_id, dtype=torch.long, device=self.device)
                logits = model.text_decoder(input_ids=start_ids, encoder_hidden_states=question, return_dict=True).logits
                prob = logits[:, 0, :].float().softmax(-1)
                out[rows] = (prob[:, yes] / (prob[:, yes] + prob[:, no])).cpu()
        return out

    def questions(self, prompt: str) -> list[str]:
        """One question per noun chunk, the chunk's text and "?" (the first ``NP_NUM``)."""
        return [f"{chunk.text}?" for chunk in list(self.parser()(prompt).noun_chunks)[:NP_NUM]]

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        asked = [self.questions(p) for p in prompts]
        owners = [i for i, qs in enumerate(asked) for _ in qs]
        p = self.p_yes(images, [q for qs in asked for q in qs], owners).tolist()
        scores, k = [], 0
        for qs in asked:
            scores.append(product_score(p[k : k + len(qs)]))
            k += len(qs)
        return torch.tensor(scores, dtype=torch.float64)


class AttributeBinding(BlipVqa):
    """LaSRO's Attribute Binding Score: per noun chunk, BLIP-VQA is asked whether the subject exists
    and, when the chunk has modifiers, whether the subject has them; an answer is "yes" when the
    decoder puts more probability on "yes" than on "no" (P(yes) > 0.5 above); the score is the
    fraction of "yes" over the image's questions (1.0 for a prompt without noun chunks).

    LaSRO gives no question wording. The defaults, both options (subclass, or register
    ``functools.partial(AttributeBinding, exist_template=..., attribute_template=...)``):
    ``exist_template = "is there {subject}?"`` with the subject the chunk's determiners/numbers and
    head noun ("a green bench" -> "is there a bench?"), and
    ``attribute_template = "is the {noun} {attribute}?"`` with the head noun and the chunk's other
    words ("is the bench green?"). It shares the loaded BLIP with ``blip-vqa``.
    """

    info = replace(
        BlipVqa.info, name="attribute_binding", version="lasro-1",
        scale="fraction of yes answers (P(yes) > 0.5) to 'is there {subject}?' / 'is the {noun} {attribute}?' per noun chunk, in [0, 1]",
    )
    exist_template = "is there {subject}?"
    attribute_template = "is the {noun} {attribute}?"

    def __init__(self, scorers: str = "official", exist_template: str | None = None, attribute_template: str | None = None):
        super().__init__(scorers)
        self.exist_template = exist_template or self.exist_template
        self.attribute_template = attribute_template or self.attribute_template

    def questions(self, prompt: str) -> list[str]:
        out = []
        for chunk in list(self.parser()(prompt).noun_chunks)[:NP_NUM]:
            root = chunk.root
            before = [t for t in chunk if t.i < root.i and t.pos_ not in ("PUNCT", "CCONJ")]
            determiners = [t.text for t in before if t.pos_ in ("DET", "NUM", "PRON")]
            attribute = [t.text for t in before if t.pos_ not in ("DET", "NUM", "PRON")]
            out.append(self.exist_template.format(subject=" ".join(determiners + [root.text])))
            if attribute:
                out.append(self.attribute_template.format(noun=root.text, attribute=" ".join(attribute)))
        return out

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        asked = [self.questions(p) for p in prompts]
        owners = [i for i, qs in enumerate(asked) for _ in qs]
        yes = (self.p_yes(images, [q for qs in asked for q in qs], owners) > 0.5).double().tolist()
        scores, k = [], 0
        for qs in asked:
            scores.append(sum(yes[k : k + len(qs)]) / len(qs) if qs else 1.0)
            k += len(qs)
        return torch.tensor(scores, dtype=torch.float64)
