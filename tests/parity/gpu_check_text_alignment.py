"""A device check of the text_alignment metric (not collected by pytest): run on a CUDA machine from
the repository root, ``OMP_NUM_THREADS=8 HF_HUB_OFFLINE=1 PYTHONPATH=. python tests/parity/gpu_check_text_alignment.py``
(a few minutes; results printed and written to $OUT/gpu_check.json). It checks:

1. ``scorers=tiny`` on CUDA: the captioner in float16, BERTScore in float32; captions and scores
   against the CPU float32 run, and one image at a time against the whole batch;
2. BERTScore on the roberta-large architecture on CUDA against the recorded bert-score numbers;
3. Florence-2-large's architecture with seeded random weights: float16 (the checkpoint's dtype and
   the model card's CUDA choice) against float32 on the same 768 px inputs: encoder and logit
   relative errors, greedy top-1 and 3-beam generated-token agreement, and fp16 generate time.
Random weights say nothing about caption quality; they show the float16 path stays finite and close.
"""

import copy
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.getcwd())
from bench.metrics import text_alignment as ta  # noqa: E402
from bench.metrics.clip import to_pil  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
PROMPTS = ["a red cat on a chair", "a small boat on a river", "", "an old house", "a dog", "the moon", "a cup of tea", "a lamp"]
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (8, 3, 96, 128), generator=g).float() / 255


def log(key, value):
    res[key] = value
    print(key, value, flush=True)
    json.dump(res, open(os.path.join(OUT, "gpu_check.json"), "w"), indent=1)


# 1. the tiny scorer on CUDA: float16 captioner, float32 BERTScore, against the CPU float32 run
t = time.time()
cpu = ta.TextAlignment("tiny")
cpu_caps, cpu_scores = cpu.caption(x), cpu.score(x, PROMPTS)
gpu = ta.TextAlignment("tiny").to("cuda")
captioner, _, bert = gpu.loaded()
gpu_caps, gpu_scores = gpu.caption(x), gpu.score(x, PROMPTS)
single = torch.cat([gpu.score(x[i : i + 1], PROMPTS[i : i + 1]) for i in range(8)])
log("tiny", {
    "captioner_dtype": str(captioner.dtype), "bert_dtype": str(next(bert.model.parameters()).dtype),
    "captions_equal_cpu": sum(a == b for a, b in zip(cpu_caps, gpu_caps)), "max_abs_score_diff_cpu": float((cpu_scores - gpu_scores).abs().max()),
    "max_abs_diff_batch_vs_single_gpu": float((single - gpu_scores).abs().max()), "seconds": round(time.time() - t, 1),
})

# 2. BERTScore on the roberta-large architecture on CUDA (float32) against the recorded package numbers
t = time.time()
case = json.load(open("tests/data/bertscore_parity.json"))["roberta-large"]
from transformers import AutoTokenizer, RobertaConfig, RobertaModel  # noqa: E402

folder = tempfile.mkdtemp()
ta.byte_bpe_files(folder, config={"tokenizer_class": "RobertaTokenizer", "model_max_length": case["model_max_length"]})
tok = AutoTokenizer.from_pretrained(folder)
model = ta.seeded_weights(RobertaModel(RobertaConfig(**{"vocab_size": len(tok), **case["config"]})), case["seed"])
scorer = ta.BertScore(model, tok, case["layer"], ta.BASELINE_ROBERTA_LARGE_L17).to("cuda")
ours = scorer(case["candidates"], case["references"])
diff = {k: float((ours[k] - torch.tensor(case["per_pair"][k], dtype=torch.float64)).abs().max()) for k in ours}
torch.cuda.synchronize()
t2 = time.time()
for _ in range(5):
    scorer(case["candidates"][:8] * 8, case["references"][:8] * 8)
torch.cuda.synchronize()
log("roberta_large_cuda_parity", {"max_abs_diff_vs_package": diff, "seconds_64_pairs": round((time.time() - t2) / 5, 3), "seconds": round(time.time() - t, 1)})
del model, scorer
torch.cuda.empty_cache()

# 3. Florence-2-large's architecture (microsoft/Florence-2-large config.json dims), seeded random weights:
#    float16 (the checkpoint's and the model card's CUDA dtype) against float32 on the same inputs
t = time.time()
from transformers import CLIPImageProcessorPil, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor  # noqa: E402

ftok = AutoTokenizer.from_pretrained(ta.tiny_florence_tokenizer_dir())
proc = Florence2Processor(
    image_processor=CLIPImageProcessorPil(do_resize=True, size={"height": 768, "width": 768}, resample=3, do_center_crop=False, do_rescale=True,
                                          rescale_factor=1 / 255, do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], image_seq_length=577),
    tokenizer=ftok, post_processor_config={"pure_text": {}},
)
cfg = Florence2Config(
    vision_config=dict(depths=[1, 1, 9, 1], embed_dim=[256, 512, 1024, 2048], num_heads=[8, 16, 32, 64], num_groups=[8, 16, 32, 64], window_size=12,
                       projection_dim=1024, max_position_embeddings=1000, max_temporal_embeddings=100, drop_path_rate=0.0),
    text_config=dict(model_type="bart", vocab_size=51289, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16, decoder_attention_heads=16,
                     encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
    image_token_id=ftok.image_token_id,
)
f32 = ta.seeded_weights(Florence2ForConditionalGeneration(cfg), 2).eval()
f32.generation_config.update(forced_bos_token_id=0, forced_eos_token_id=2, no_repeat_ngram_size=3, num_beams=3, early_stopping=True)
f16 = copy.deepcopy(f32).to("cuda", torch.float16)
f32 = f32.to("cuda")
inputs = proc(text=["<DETAILED_CAPTION>"] * 8, images=to_pil(x), return_tensors="pt")
ids, pix = inputs["input_ids"].cuda(), inputs["pixel_values"].cuda()
dec = torch.tensor([[2, 0, 400, 401, 402]] * 8, device="cuda")
with torch.no_grad():
    o32 = f32(input_ids=ids, pixel_values=pix, decoder_input_ids=dec)
    o16 = f16(input_ids=ids, pixel_values=pix.half(), decoder_input_ids=dec)
    enc_rel = float((o16.encoder_last_hidden_state.float() - o32.encoder_last_hidden_state).norm() / o32.encoder_last_hidden_state.norm())
    logit_rel = float((o16.logits.float() - o32.logits).norm() / o32.logits.norm())
    top1 = float((o16.logits.argmax(-1) == o32.logits.argmax(-1)).float().mean())
    finite = bool(torch.isfinite(o16.logits).all() and torch.isfinite(o16.encoder_last_hidden_state).all())
    g32 = f32.generate(input_ids=ids, pixel_values=pix, max_new_tokens=32, num_beams=3, do_sample=False)
    torch.cuda.synchronize()
    t2 = time.time()
    g16 = f16.generate(input_ids=ids, pixel_values=pix.half(), max_new_tokens=32, num_beams=3, do_sample=False)
    torch.cuda.synchronize()
    gen_s = time.time() - t2
n = min(g32.shape[1], g16.shape[1])
log("florence2_large_fp16_vs_fp32", {
    "encoder_rel_err": enc_rel, "logits_rel_err": logit_rel, "top1_agreement": top1, "fp16_finite": finite,
    "generated_token_agreement": float((g32[:, :n] == g16[:, :n]).float().mean()), "sequences_identical": int((g32[:, :n] == g16[:, :n]).all(1).sum()),
    "fp16_generate_8_images_32_tokens_s": round(gen_s, 2), "max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1), "seconds": round(time.time() - t, 1),
})
