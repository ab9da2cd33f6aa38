"""Record the official ImageReward package's scores for tests/test_imagereward.py.

``image-reward`` 1.5 cannot be installed beside this project (it needs timm 0.6.13 and a transformers
4 that still exports ``apply_chunking_to_forward`` from ``modeling_utils``), so it runs once in a venv
of its own that shadows those packages and takes torch, torchvision, numpy and PIL from the system::

    python -m venv --system-site-packages /tmp/venv-ir
    /tmp/venv-ir/bin/pip install --no-deps image-reward==1.5
    /tmp/venv-ir/bin/pip install "transformers==4.36.2" "tokenizers<0.19" "huggingface_hub<0.25" \\
        "timm==0.6.13" "fairscale==0.4.13" "setuptools<81" clip-anytorch ftfy
    cd REPO && PYTHONPATH=REPO OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 /tmp/venv-ir/bin/python tests/parity/record_imagereward.py

It writes ``tests/data/imagereward_parity.json``: for each case of ``imagereward_case.CASES``, the
scores of ``ImageReward.score(prompt, image_path)`` (the package's one-image path) on the seeded
weights (saved as ``ImageReward.pt``, loaded by the package's ``ImageReward.load``) and the seeded
images (saved as PNG), with digests of the state-dict layout and of the pixels so the test can tell
that it rebuilt the same inputs. What is patched, and nothing else:

* ``ImageReward.ReFL`` (the fine-tuning script, imported by the package's ``__init__``; it needs
  diffusers/datasets versions that this venv does not have) is replaced by an empty module; scoring
  never touches it;
* ``BertTokenizer.from_pretrained('bert-base-uncased')`` in the package's ``init_tokenizer`` reads the
  local WordPiece vocabulary of ``bench.metrics.imagereward.write_wordpiece_vocab`` (no hub here); the
  special tokens are still added by the package's own code;
* for the ``small`` case only, the package's ``create_vit`` builds its own ``VisionTransformer`` with
  the small case's dimensions instead of ViT-L.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import types
from importlib.metadata import version
from pathlib import Path

import torch
from PIL import Image

import imagereward_case as case  # this folder (sys.path[0] when run as a script)

sys.modules["ImageReward.ReFL"] = types.ModuleType("ImageReward.ReFL")
import transformers  # noqa: E402

import ImageReward as RM  # noqa: E402
import ImageReward.models.BLIP.blip as package_blip  # noqa: E402
import ImageReward.models.BLIP.blip_pretrain as package_blip_pretrain  # noqa: E402
from ImageReward.models.BLIP.vit import VisionTransformer as PackageViT  # noqa: E402

from bench.metrics.imagereward import write_wordpiece_vocab  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "imagereward_parity.json"


def record(name: str, spec: dict, work: Path, vocab_dir: Path) -> dict:
    class LocalBertTokenizer(transformers.BertTokenizer):
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return transformers.BertTokenizer.from_pretrained(str(vocab_dir))

    package_blip.BertTokenizer = LocalBertTokenizer
    original_create_vit = package_blip_pretrain.create_vit
    if name == "small":
        vit = spec["vit"]
        package_blip_pretrain.create_vit = lambda *args, **kwargs: (PackageViT(img_size=224, **vit), vit["embed_dim"])
    try:
        folder = work / name
        folder.mkdir()
        (folder / "med_config.json").write_text(json.dumps(spec["med_config"], indent=2))
        # The layout of the package's state dict, from a model the package builds; then the seeded weights.
        layout = RM.ImageReward(med_config=str(folder / "med_config.json"), device="cpu").state_dict()
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in layout.items()}
        del layout
        torch.save(case.seeded_state_dict(shapes), folder / "ImageReward.pt")
        model = RM.load(str(folder / "ImageReward.pt"), device="cpu", med_config=str(folder / "med_config.json"))
    finally:
        package_blip_pretrain.create_vit = original_create_vit

    arrays = case.image_arrays()
    paths = []
    for i, array in enumerate(arrays):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(array).save(paths[-1])
    scores, start = [], time.perf_counter()
    with torch.no_grad():
        for prompt, path in zip(case.PROMPTS, paths):
            scores.append(model.score(prompt, str(path)))
    seconds = (time.perf_counter() - start) / len(paths)
    print(f"{name}: {len(shapes)} tensors, {sum(torch.Size(s).numel() for s, _ in shapes.values()) / 1e6:.1f}M values; "
          f"package {seconds:.3f} s/image; scores {[round(s, 4) for s in scores]}", file=sys.stderr)
    return {
        "state_dict_layout_sha256": case.shapes_digest(shapes),
        "n_tensors": len(shapes),
        "image_sha256": [case.array_digest(a) for a in arrays],
        "prompts": case.PROMPTS,
        "scores": scores,
        "package_cpu_seconds_per_image": round(seconds, 3),
    }


def main() -> None:
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="imagereward-parity-") as tmp:
        work = Path(tmp)
        vocab_dir = write_wordpiece_vocab(work / "bert-vocab")
        cases = {name: record(name, spec, work, vocab_dir) for name, spec in case.CASES.items() if len(sys.argv) < 2 or name in sys.argv[1:]}
    old = json.loads(OUT.read_text())["cases"] if OUT.is_file() else {}
    result = {
        "how": "tests/parity/record_imagereward.py: the official image-reward package's ImageReward.score(prompt, image_path), "
        "one image per call, on the seeded weights and images of tests/parity/imagereward_case.py, CPU float32",
        "versions": {p: version(p) for p in ("image-reward", "transformers", "tokenizers", "timm", "torch", "torchvision", "numpy", "pillow")},
        "torch_threads": torch.get_num_threads(),
        "cases": {**old, **cases},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
