"""The core as named stages: one run identity, and functions short enough to read as a sequence of steps."""

from __future__ import annotations

import ast
from pathlib import Path

from bench.config import stable_hash
from bench.runner import RunIdentity, Session

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def identity(**changes) -> RunIdentity:
    base = dict(
        model={"source": "tiny", "build_hash": "abc"}, sampler={"kind": "ddim", "steps": 4, "guidance": 1.0}, checkpoint=None, suite="micro",
        prompts_sha256="p" * 64, images_per_prompt=2, metrics=("brightness",), seed=0, dtype="float64", stats={"n_boot": 10}, baseline=None,
    )
    return RunIdentity(**(base | changes))


def test_the_identity_holds_its_optional_parts_only_where_present():
    plain = identity().as_dict()
    assert set(plain) == {"model", "sampler", "checkpoint", "suite", "prompts_sha256", "images_per_prompt", "metrics", "seed", "dtype", "stats", "baseline"}
    assert plain["metrics"] == ["brightness"]  # as JSON writes it, so the hash does not depend on list or tuple
    tiny = identity(scorers="tiny", references_sha256="r", protocol={"name": "p", "overrides": ["train.steps=2"]}).as_dict()
    assert tiny["scorers"] == "tiny" and tiny["references_sha256"] == "r"
    assert tiny["protocol"] == {"name": "p"}  # a cell's overrides are in the identity already (model, sampler, prompts ...)
    assert identity(scorers="official").as_dict() == plain


def test_the_run_folder_is_named_by_the_identity_hash():
    ident = identity()
    assert ident.hash == stable_hash(ident.as_dict())
    assert ident.run_id("tiny", "base") == f"micro-tiny-base-{ident.hash[:8]}"
    assert identity(seed=1).hash != ident.hash and identity(baseline="x").hash != ident.hash


def test_evaluate_reads_as_a_sequence_of_stages():
    """Session.evaluate calls its stages in order and does nothing else at length."""
    path = REPO / "bench" / "runner.py"
    session = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == "Session")
    method = next(n for n in session.body if isinstance(n, ast.FunctionDef) and n.name == "evaluate")
    source = ast.get_source_segment(path.read_text(), method)
    order = [source.index(f"self.{stage}(") for stage in ("plan_run", "score", "aggregate", "manifest")]
    assert order == sorted(order) and source.index("generate(") < order[1]
    assert len(source.splitlines()) <= 20
    for stage in ("plan_run", "score", "aggregate", "manifest"):
        assert callable(getattr(Session, stage))


def test_no_function_in_bench_is_longer_than_60_lines_unless_it_says_why():
    """A long function is a sequence of stages waiting to be named; where one is kept long, its
    docstring says why ("Long because ...")."""
    long = []
    for path in sorted((REPO / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named steps, or say why in the docstring: " + "; ".join(long)


def test_copy_weights_refuses_a_misfit_before_copying_anything():
    import pytest
    import torch

    from bench.weights import base_copy, copy_weights

    layer = torch.nn.Linear(2, 2)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="1 unknown"):
        copy_weights(layer, {"weight": torch.ones(2, 2), "nope": torch.ones(1)}, lambda n: ValueError(f"{n} unknown"))
    assert torch.equal(layer.weight, before)
    copy_weights(layer, {"weight": torch.ones(2, 2)})
    assert torch.equal(layer.weight, torch.ones(2, 2))

    from peft import LoraConfig, inject_adapter_in_model

    wrapped = inject_adapter_in_model(LoraConfig(r=1, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    plain = base_copy(wrapped)
    assert [n for n, _ in plain.named_parameters()] == ["0.weight", "0.bias"]  # the LoRA layer gone, the base weights kept
    assert any("lora_" in n for n, _ in wrapped.named_parameters())  # the original keeps its adapters


def test_self_generated_pairs_keep_the_rewards_they_were_ranked_by():
    from types import SimpleNamespace

    import torch

    from bench.methods.preference_data import MemoryPairs

    data = {
        "latents_w": torch.arange(4.0).reshape(4, 1, 1, 1), "latents_l": -torch.arange(4.0).reshape(4, 1, 1, 1),
        "prompt_index": torch.tensor([0, 1, 2, 3]), "reward_w": torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64),
        "reward_l": torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), "ties_dropped": torch.tensor(0),
    }
    ctx = SimpleNamespace(batch_size=3, device=torch.device("cpu"), model=SimpleNamespace(dtype=torch.float32))
    pairs = MemoryPairs(data, ["a", "b", "c", "d"]).sample(ctx, torch.Generator().manual_seed(0))
    rows = pairs.x_w.flatten().long()
    assert torch.equal(pairs.reward_w, data["reward_w"][rows]) and torch.equal(pairs.reward_l, data["reward_l"][rows])
    assert pairs.prompts == [["a", "b", "c", "d"][int(i)] for i in rows]
    del data["reward_w"], data["reward_l"]  # given target images: no rewards
    assert MemoryPairs(data, ["a", "b", "c", "d"]).sample(ctx, torch.Generator()).reward_w is None
