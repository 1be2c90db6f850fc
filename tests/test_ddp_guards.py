"""Skipped steps and uneven batches under DDP: two gloo ranks where only one rank sees a NaN loss, a
batch one sample short, or a batch emptied by undecodable samples train exactly like one process on the
same global batches (the same steps skipped, the same weights, EMA and optimizer state), and nothing
hangs. Also: the bad-step limit, and the EMA under gradient accumulation."""

import os
import socket

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from t2i.lit.clip import CLIPModule
from t2i.lit.transformer import TransformerModule

STEPS = 5
PER_RANK = 4
# per step, rank 1 alone misbehaves: (samples dropped as undecodable, a NaN-making sample): a NaN loss,
# a batch one short, an empty batch, and at the last step every rank empty
EVENTS = {1: (0, True), 2: (1, False), 3: (PER_RANK, False), 4: (PER_RANK, False)}


class PoisonMixin:
    """A sample with ``poison=1`` makes the loss NaN, as a numerical blow-up on one rank would."""

    def _poisoned(self, batch, x):
        return x * torch.where(batch["poison"].any(), float("nan"), 1.0)  # NaN gradients too


class Transformer(PoisonMixin, TransformerModule):
    def _losses(self, batch, model=None):
        out = super()._losses(batch, model)
        if "poison" in batch:
            out["loss"] = self._poisoned(batch, out["loss"])
        return out


class CLIP(PoisonMixin, CLIPModule):
    def _features(self, batch):
        image, text = super()._features(batch)
        return (self._poisoned(batch, image), text) if "poison" in batch else (image, text)


def transformer():
    torch.manual_seed(0)
    return Transformer(model=dict(text_vocab=20, text_pad_id=0, text_len=6, image_vocab=16, image_grid=[2, 2],
                                  n_layer=1, n_head=2, d_model=32, dropout=0.0), lr=1e-2, warmup_steps=0,
                       schedule="constant", ema_decay=0.9, max_bad_steps=3)


def plain_transformer():
    """The transformer without the NaN-making test sample."""
    module = transformer()
    module._poisoned = lambda batch, x: x
    return module


def clip():
    torch.manual_seed(0)
    return CLIP(model=dict(vocab_size=20, text_len=6, pad_id=0, image_size=8, embed_dim=8, patch_size=4,
                           vision_width=16, vision_layers=1, vision_heads=2, text_width=16, text_layers=1,
                           text_heads=2), lr=1e-2, warmup_steps=0, schedule="constant")


def samples(rank: int, world: int) -> list[dict]:
    """The samples this rank loads (all ranks' with ``world=1``), in loader order; undecodable ones
    carry ``bad`` (dropped by the collate function, as the datamodules do)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        for r in range(2):
            dropped, poison = EVENTS.get(step, (0, False)) if r == 1 or step == STEPS - 1 else (0, False)
            for i in range(PER_RANK):
                s = {"text": torch.randint(1, 20, (6,), generator=g), "codes": torch.randint(0, 16, (2, 2), generator=g),
                     "image": torch.rand(3, 8, 8, generator=g) * 2 - 1, "key": f"{step}-{r}-{i}",
                     "poison": torch.tensor(poison and i == 0), "bad": i >= PER_RANK - dropped}
                if world == 1 or r == rank:
                    out.append(s)
    return out


def collate(items: list[dict]) -> dict:
    good = [s for s in items if not s["bad"]]
    keys = ("text", "codes", "image", "poison")
    if not good:  # shapes kept, zero rows
        return {k: torch.stack([s[k] for s in items])[:0] for k in keys} | {"key": []}
    return {k: torch.stack([s[k] for s in good]) for k in keys} | {"key": [s["key"] for s in good]}


def fit(module, rank: int, world: int) -> dict:
    loader = DataLoader(samples(rank, world), batch_size=PER_RANK * (2 if world == 1 else 1), collate_fn=collate)
    strategy = pl.strategies.DDPStrategy(process_group_backend="gloo") if world > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, limit_val_batches=0, deterministic=True)
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        torch.use_deterministic_algorithms(False)  # deterministic=True set it for the process
    opt = trainer.optimizers[0].state_dict()["state"]
    return {"weights": {k: v.clone() for k, v in module.state_dict().items()},
            "optimizer": {f"{p}.{k}": torch.as_tensor(v).clone() for p, s in opt.items() for k, v in s.items()},
            "skipped": int(module.guard.skipped), "global_step": trainer.global_step}


def _rank(rank: int, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      GROUP_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TORCHELASTIC_RUN_ID="guards")
    torch.set_num_threads(1)
    out[rank] = {"transformer": fit(transformer(), rank, 2), "clip": fit(clip(), rank, 2)}


def comparable(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` without the key bias of a fused ``qkv`` projection: softmax ignores it, so its gradient is
    float noise (1e-9) that Adam scales up to +-lr differently in any two summation orders."""
    if name.endswith("qkv.bias"):
        w = x.shape[0] // 3
        return torch.cat([x[:w], x[2 * w:]])
    return x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(target, timeout: float) -> dict:
    """Run ``target(rank, port, out)`` in two spawned processes; ``out`` (rank -> result) once both exit 0. A rank
    still alive after ``timeout`` seconds is killed and fails the test as hung."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=target, args=(r, port, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        codes = [p.exitcode for p in procs]
        for p in procs:
            if p.is_alive():
                p.kill()
        assert codes == [0, 0], f"a rank failed or hung: exit codes {codes}"
        return dict(out)


def test_one_rank_nan_short_and_empty_batches_match_one_process():
    ddp = two_ranks(_rank, 240)
    one = {"transformer": fit(transformer(), 0, 1), "clip": fit(clip(), 0, 1)}
    for name in ("transformer", "clip"):
        ref = one[name]
        # the NaN step and the all-empty step are skipped everywhere; the short and one-rank-empty steps are
        # taken, on the samples there are
        assert ref["skipped"] == 2 and ref["global_step"] == STEPS, name
        for rank in (0, 1):
            got = ddp[rank][name]
            assert (got["skipped"], got["global_step"]) == (2, STEPS), (name, rank)
            for part in ("weights", "optimizer"):
                assert set(got[part]) == set(ref[part])
                bad = {k: (comparable(k, got[part][k]) - comparable(k, v)).abs().max().item()
                       for k, v in ref[part].items()
                       if not torch.allclose(comparable(k, got[part][k]), comparable(k, v), rtol=0, atol=2e-5)}
                assert not bad, (name, rank, bad)
    # the runs trained (the comparison is not between untouched initial weights)
    assert not torch.equal(one["transformer"]["weights"]["model.text_emb.weight"],
                           transformer().state_dict()["model.text_emb.weight"])
    assert any(k.startswith("ema.") for k in one["transformer"]["weights"])


@pytest.mark.parametrize("make", [transformer, clip])
def test_many_bad_steps_in_a_row_stop_with_a_clear_error(make):
    module = make()
    module.guard.max_bad = module.guard.check_every = 2

    def poisoned(rank, world):
        data = samples(rank, world)
        for s in data:
            s["poison"] = torch.tensor(True)
        return data

    from t2i.errors import T2IError

    loader = DataLoader(poisoned(0, 1), batch_size=8, collate_fn=collate)
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(T2IError, match="NaN/inf for 2 steps in a row"):
        trainer.fit(module, train_dataloaders=loader)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()), "skipped steps changed weights"


def test_ema_follows_optimizer_steps_not_micro_batches(monkeypatch):
    """With accumulate_grad_batches=2, 6 batches make 3 optimizer steps and 3 EMA updates of decay d (not
    6 of d, i.e. d^2 per step); the fused update equals the textbook one on the weights after each step."""
    import t2i.lit.transformer as lit

    module = plain_transformer()
    d = module.hparams.ema_decay
    expected = [p.detach().clone() for p in module.ema.parameters()]
    updates = []
    real = lit.ema_update

    def spy(ema, model, decay, ok=None):
        updates.append(bool(ok))
        for e, p in zip(expected, model.parameters()):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        real(ema, model, decay, ok)

    monkeypatch.setattr(lit, "ema_update", spy)
    good = [s for s in samples(0, 1) if not s["bad"]]
    loader = DataLoader((good * 2)[:48], batch_size=8, collate_fn=collate)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 3 and updates == [True, True, True] and d == 0.9
    for e, got in zip(expected, module.ema.parameters()):
        torch.testing.assert_close(got, e, rtol=0, atol=1e-6)
    assert not torch.equal(module.ema.text_emb.weight, module.model.text_emb.weight)
