"""Reference for tests/test_t2i_compbench.py: T2I-CompBench's BLIP-VQA on salesforce-lavis's BLIP.

Run in a separate venv holding salesforce-lavis (and transformers 4.x); see the test's docstring.
``python blip_vqa_lavis.py WORK_DIR``: WORK_DIR holds ``vocab/`` (a BERT vocabulary), ``images/*.png``
and ``questions.json`` ({image file: [questions]}). It builds LAVIS's ``blip_vqa`` (the vqav2 config:
ViT-B/16 at 480 and BERT-base, the architecture of model_base_vqa_capfilt_large.pth) with seeded
random weights, saves them in the official checkpoint layout (``{"model": state_dict}``) to
``WORK_DIR/blip_vqa.pth`` and writes ``reference.json``: each pair's P(yes) and each image's score,
computed as T2I-CompBench's BLIP code does (its test transform, ``pre_question``, ``[ENC]`` as the
question's first token, and ``vqa_prob`` on the decoder's first token, then the rounded product of
BLIP_vqa.py).
"""

import json
import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import InterpolationMode
from transformers import BertTokenizer

import lavis
from lavis.models.blip_models.blip import BlipBase
from lavis.models.blip_models.blip_vqa import BlipVQA

work = Path(sys.argv[1])


def init_tokenizer(cls):  # BLIP's init_tokenizer on a local vocabulary instead of the hub's bert-base-uncased
    tokenizer = BertTokenizer.from_pretrained(str(work / "vocab"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer


BlipBase.init_tokenizer = classmethod(init_tokenizer)
BlipVQA.load_checkpoint_from_config = lambda self, cfg, **kw: None  # random weights, no download

cfg = OmegaConf.load(Path(lavis.__path__[0]) / "configs/models/blip_vqav2.yaml").model
cfg.med_config_path = str(Path(lavis.__path__[0]) / cfg.med_config_path)
torch.manual_seed(0)
model = BlipVQA.from_config(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():  # N(0, 0.05): the default init answers every question alike
        if p.dim() > 1:
            p.normal_(0, 0.05)
    for layer in model.text_encoder.encoder.layer:  # the image less loud in the question states: the questions matter too
        layer.crossattention.output.dense.weight *= 0.3
    model.text_decoder.cls.predictions.bias[[2748, 2053]] = 0


def pre_question(question, max_ques_words=50):
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower())
    question = question.rstrip(" ")
    words = question.split(" ")
    if len(words) > max_ques_words:
        question = " ".join(words[:max_ques_words])
    return question


normalize = transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
transform_test = transforms.Compose([transforms.Resize((480, 480), interpolation=InterpolationMode.BICUBIC), transforms.ToTensor(), normalize])


@torch.no_grad()
def vqa_prob(image, question, logit_gap=False):
    """BLIP_VQA.forward(train=False, inference='vqa_prob') of T2I-CompBench for one (image, question)."""
    image_embeds = model.visual_encoder.forward_features(image)
    image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
    question = model.tokenizer(question, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    question.input_ids[:, 0] = model.tokenizer.enc_token_id
    question_output = model.text_encoder(question.input_ids, attention_mask=question.attention_mask, encoder_hidden_states=image_embeds,
                                         encoder_attention_mask=image_atts, return_dict=True)
    start_ids = torch.tensor(30522).repeat(1, 1)
    start_output = model.text_decoder(start_ids, encoder_hidden_states=question_output.last_hidden_state,
                                      encoder_attention_mask=question.attention_mask, return_dict=True, reduction="none")
    if logit_gap:
        return (start_output.logits[:, 0, 2748] - start_output.logits[:, 0, 2053]).item()
    prob = torch.softmax(start_output.logits[:, 0, :], dim=1)
    return (prob[:, 2748] / (prob[:, 2748] + prob[:, 2053])).item()


questions = json.loads((work / "questions.json").read_text())
images = {name: transform_test(Image.open(work / "images" / name).convert("RGB")).unsqueeze(0) for name in questions}
gaps = [vqa_prob(images[name], [pre_question(q)], logit_gap=True) for name, qs in questions.items() for q in qs]
with torch.no_grad():  # read "yes"/"no" out louder and centred, so the answers spread over (0, 1)
    gaps = torch.tensor(gaps, dtype=torch.float64)
    scale = 2.0 / gaps.std().item()
    head = model.text_decoder.cls.predictions
    head.decoder.weight[[2748, 2053]] *= scale  # tied with the decoder's input embeddings of yes/no, never read here
    head.bias[2748] = -scale * gaps.mean().item()
torch.save({"model": model.state_dict()}, work / "blip_vqa.pth")
out = {}
for name, qs in questions.items():
    image = images[name]
    p_yes = [vqa_prob(image, [pre_question(q)]) for q in qs]
    reward = torch.ones(())  # BLIP_vqa.py: the float32 product of the answers written with 4 decimals
    for p in p_yes:
        reward = reward * float("{:.4f}".format(p))
    out[name] = {"p_yes": p_yes, "score": float("{:.4f}".format(reward.item()))}
(work / "reference.json").write_text(json.dumps(out))
print("reference written")
