"""The method data contract: a method's ``prepare`` returns its data source (tensors the trainer
caches, or an object read as training goes), the loss reads what ``prepare`` returned, and the
trainer tells a source of each resumable checkpoint, so online rounds live in the trainer's folder
and go once no resume can read them."""

from __future__ import annotations

import torch

from bench.config import compose, to_dict
from bench.method import Method, RoundStore
from bench.methods.online import OnlineRounds, OnlineSpec
from bench.methods.spo import StepwiseRounds
from bench.trainer import Trainer


def round_data(r: int, pairs: int = 1) -> dict[str, torch.Tensor]:
    return {"states": torch.full((pairs, 2), float(r)), "step": torch.zeros(pairs, dtype=torch.long)}


def test_a_round_store_in_memory_behaves_as_one_on_disk(tmp_path):
    for store in (RoundStore(), RoundStore(tmp_path / "rounds")):
        assert store.load(0) is None and store.read_index() is None
        for r in range(3):
            store.save(r, round_data(r))
        store.write_index({"pairs": [1, 1, 1]})
        store.drop_before(2)
        assert store.load(0) is None and store.load(1) is None and torch.equal(store.load(2)["states"], round_data(2)["states"])
        assert store.read_index() == {"pairs": [1, 1, 1]}
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir()) == ["index.json", "round-000002.safetensors"]


def test_online_rounds_keep_the_round_a_resume_starts_in():
    spec = OnlineSpec(name="x", prompts_per_round=2, seed=0)
    store = RoundStore()
    rounds = OnlineRounds(spec, 2, "x", steps_per_round=3, store=store)
    for r in range(4):
        store.save(r, round_data(r))
    rounds.checkpointed(5)  # steps 3-5 are round 1: a resume at step 5 reads it
    assert [r for r in range(4) if store.load(r) is not None] == [1, 2, 3]
    rounds.checkpointed(6)
    assert [r for r in range(4) if store.load(r) is not None] == [2, 3]


def test_rounds_of_variable_length_keep_the_round_a_resume_starts_in():
    from types import SimpleNamespace

    ctx = SimpleNamespace(rounds=RoundStore(), batch_size=2, grad_accum=1)
    spec = SimpleNamespace(prompts_per_round=2, epochs_per_round=1, seed=0)
    rounds = StepwiseRounds(spec, "spo", ctx)
    for r, pairs in enumerate([4, 0, 6, 2]):  # 2, 0, 3 and 1 optimizer steps: rounds start at steps 0, 2, 2, 5
        rounds.save(ctx, r, round_data(r, pairs), rounds.counts(ctx))
    assert rounds.counts(ctx) == [4, 0, 6, 2]
    rounds.checkpointed(4)  # inside round 2 (steps 2-4): rounds 0 and 1 (which trains no step) go
    assert [r for r in range(4) if ctx.rounds.load(r) is not None] == [2, 3]


class SourceRecipe(Method):
    """A recipe whose data source is an object: it counts the loss calls that read it and hears of each checkpoint."""

    def prepare(self, ctx):
        return SourceRecipe.Source()

    class Source:
        def __init__(self):
            self.reads, self.checkpoints = 0, []

        def checkpointed(self, step: int) -> None:
            self.checkpoints.append(step)

    def loss(self, ctx, data, generator):
        data.reads += 1
        params = [p for p in ctx.model.unet.parameters() if p.requires_grad]
        return sum(((p - 0.01) ** 2).sum() for p in params), {}

    def data_manifest(self, ctx, data) -> dict:
        return {"reads": data.reads, "checkpoints": data.checkpoints}


def test_the_trainer_hands_the_loss_what_prepare_returned_and_tells_it_of_each_checkpoint(model, tmp_path):
    cfg = to_dict(compose(["method=sft", "train.steps=5", "train.save_every=2", "train.batch_size=2", "train.grad_accum=2"]))
    trainer = Trainer(cfg, model, SourceRecipe(cfg["method"]), ["a red cube"], None, torch.device("cpu"), tmp_path, progress=False)
    ckpt = trainer.run()
    assert ckpt.data == {"reads": 10, "checkpoints": [2, 4]}  # 5 steps x 2 micro-batches; saves after steps 2 and 4 (5 is the final)
    assert trainer.data_source.checkpoints == [2, 4] and not list((tmp_path / "data").glob("*"))  # an object source is never cached
