"""Record what the official ``bert-score`` package computes, for tests/test_text_alignment.py to check against.

The package (0.3.13) was written for transformers 4: on transformers 5 its ``add_prefix_space=True``
is silently ignored and its empty-sentence path calls a method that no longer exists. So it runs in
its own virtual environment with transformers 4.57.6, next to (not inside) this project's:

    python -m venv --system-site-packages /tmp/venv-bs4
    /tmp/venv-bs4/bin/pip install "transformers==4.57.6" matplotlib   # matplotlib: bert_score imports it
    /tmp/venv-bs4/bin/pip install bert-score==0.3.13 --no-deps
    PYTHONPATH=. OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 /tmp/venv-bs4/bin/python tests/parity/record_bertscore.py [--large]

Each case builds a RoBERTa from a config and a seed (``seeded_weights``: the same tensors in both
environments), saves it with this project's tiny byte-level BPE tokenizer to a temporary folder and
scores the sentence pairs with ``bert_score.score(model_type=FOLDER, num_layers=LAYER)``: one pair per
batch (``batch_size=1``, no padding anywhere) and in one batch (the package's default). ``--large``
adds the roberta-large architecture (24 layers of width 1024, layer 17; about a minute on 2 cores).
Writes tests/data/bertscore_parity.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.metrics import text_alignment as ta  # noqa: E402

OUT = ROOT / "tests" / "data" / "bertscore_parity.json"

# (candidate = caption, reference = prompt): overlap, identity, case and punctuation, bytes outside the
# tiny vocabulary, runs of whitespace, empty and blank sides, and a side longer than the model's limit.
PAIRS = [
    ("a red cat sitting on a chair", "a red cat on a chair"),
    ("The image shows a small boat on a river.", "a boat on the river, oil painting"),
    ("a photo of a dog", "a photo of a dog"),
    ("An astronaut rides a horse!!", "astronaut riding a horse on the moon"),
    ("  a  dark   city street  ", "city street at night\nneon lights"),
    ("a caf\u00e9 in Paris \u2014 tr\u00e8s jolie", "a cafe in paris"),
    ("", "a cup of tea"),
    ("a cup of tea", ""),
    ("   ", "a lamp"),
    ("a tree " * 40, "a large old tree in a green field"),
]
LONG_PAIR = ("the sun and the moon over the city " * 80, "a bright sun over a city")  # > 512 tokens

CASES = {
    "tiny": {"config": ta.TINY_ROBERTA, "layer": ta.TINY_ROBERTA_LAYER, "seed": ta.TINY_SEED, "model_max_length": 64, "pairs": PAIRS},
    "roberta-large": {
        "config": dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
            type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2, vocab_size=50265,
        ),
        "layer": 17, "seed": 1, "model_max_length": 512, "pairs": PAIRS + [LONG_PAIR],
    },
}


def build(case: dict, folder: Path) -> None:
    from transformers import RobertaConfig, RobertaModel

    ta.byte_bpe_files(folder, config={"tokenizer_class": "RobertaTokenizer", "model_max_length": case["model_max_length"]})
    vocab = len(json.loads((folder / "vocab.json").read_text()))
    config = RobertaConfig(**{"vocab_size": vocab, **case["config"]})
    ta.seeded_weights(RobertaModel(config), case["seed"]).save_pretrained(folder)


def record(name: str) -> dict:
    import bert_score
    import transformers

    case = CASES[name]
    cands, refs = [p[0] for p in case["pairs"]], [p[1] for p in case["pairs"]]
    folder = Path(tempfile.mkdtemp(prefix=f"bertscore-{name}-"))
    try:
        build(case, folder)
        # bert-score reads row LAYER of the baseline file: a copy whose every row is roberta-large's
        # layer-17 baseline rescales the tiny model with the constants the metric uses.
        official = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / "roberta-large.tsv"
        rows = official.read_text().splitlines()
        l17 = rows[1 + 17].split(",")[1:]
        baseline = folder / "baseline.tsv"
        baseline.write_text("\n".join([rows[0]] + [",".join([str(i), *l17]) for i in range(case["layer"] + 1)]) + "\n")
        common = dict(model_type=str(folder), num_layers=case["layer"], lang="en", device="cpu")
        one = bert_score.score(cands, refs, batch_size=1, **common)
        batched = bert_score.score(cands, refs, **common)
        rescaled = bert_score.score(cands, refs, batch_size=1, rescale_with_baseline=True, baseline_path=str(baseline), **common)
    finally:
        shutil.rmtree(folder)
    as_dict = lambda prf: {k: v.tolist() for k, v in zip(("precision", "recall", "f1"), prf)}  # noqa: E731
    return {
        **{k: case[k] for k in ("config", "layer", "seed", "model_max_length")},
        "candidates": cands, "references": refs,
        "per_pair": as_dict(one), "batched": as_dict(batched), "rescaled": as_dict(rescaled),
        "baseline_l17": dict(zip(("precision", "recall", "f1"), map(float, l17))),
        "versions": {"bert-score": "0.3.13", "transformers": transformers.__version__, "torch": torch.__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also record the roberta-large architecture (slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recorded = json.loads(OUT.read_text()) if OUT.exists() else {}
    for name in ["tiny"] + (["roberta-large"] if args.large else []):
        recorded[name] = record(name)
        print(name, "f1 per pair:", [round(x, 6) for x in recorded[name]["per_pair"]["f1"]])
    OUT.write_text(json.dumps(recorded, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
