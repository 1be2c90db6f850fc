"""No host sync in the training steps: over a few steps of the transformer, CLIP and VQGAN (GAN phase,
dead-code restarts on) modules, nothing reads a tensor on the host (``.item()``, ``bool()``, ``int()``,
``float()``, ``.tolist()``, ``.numpy()``), counted by wrapping those methods -- neither t2i code nor
Lightning's (which reads progress-bar metrics after every batch: the loss goes to the bar only when a
bar is shown; the loggers read every ``log_every_n_steps``). (On a GPU
``torch.cuda.set_sync_debug_mode`` would also see syncs inside kernels' launch code, e.g. boolean-mask
indexing; the code avoids those by construction -- masks are applied with ``torch.where``.)"""

import traceback

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from t2i.lit.vqgan import VQGANModule
from t2i.models import quantizers
from tests.test_ddp_guards import clip, collate, samples, transformer

SYNCS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter(pl.Callback):
    """Records the line behind every host read of a tensor made from the first training batch's start to
    the epoch's end (the steps: forward, backward, clipping, optimizer, EMA, the modules' batch hooks):
    ``calls`` from our code, ``library`` from torch / Lightning."""

    def __init__(self):
        self.calls: list[str] = []
        self.library: list[str] = []
        self.steps = 0
        self._on = False
        self._originals = {}

    def __enter__(self):
        for name in SYNCS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original

            def wrapper(t, *a, _original=original, _name=name, **k):
                if self._on:
                    self._record(_name)
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def _record(self, name):
        caller = traceback.extract_stack()[-3]  # [-1]: here, [-2]: the wrapper
        if "site-packages" in caller.filename:  # torch / Lightning internals
            self.library.append(f"{name} at {caller.filename}:{caller.lineno}")
        else:
            self.calls.append(f"{name} at {caller.filename}:{caller.lineno}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._on = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1  # still counting: the module's own on_train_batch_end runs after this

    def on_train_epoch_end(self, trainer, pl_module):
        self._on = False


def run_steps(module, steps: int = 4, batch_size: int = 8, optimizers: int = 1) -> SyncCounter:
    loader = DataLoader(samples(0, 1)[: steps * batch_size], batch_size=batch_size, collate_fn=collate)
    with SyncCounter() as counter:
        trainer = pl.Trainer(accelerator="cpu", max_steps=steps * optimizers, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             callbacks=[counter])  # log_every_n_steps=50: the loggers read nothing here
        trainer.fit(module, train_dataloaders=loader)
    return counter


def plain(module):
    """The shared test module without its NaN-making sample, and with the default bad-step limit (20,
    read on the host every 10 steps: not within these 4)."""
    module._poisoned = lambda batch, x: x
    module.guard.max_bad, module.guard.check_every = 20, 10
    return module


def test_transformer_and_clip_steps_read_nothing_on_the_host():
    for make in (transformer, clip):
        counter = run_steps(plain(make()))
        assert counter.steps == 4
        assert counter.calls == [], f"{make.__name__}: {counter.calls}"
        assert counter.library == [], f"{make.__name__}: {counter.library}"  # Lightning's progress-bar floats


def test_vqgan_gan_step_reads_nothing_on_the_host(monkeypatch):
    """The accelerator's path (on the CPU the restart check reads the dead-code count, which is free
    there; see the next test): switched on here so that it runs on this CPU."""
    monkeypatch.setattr(quantizers, "HOST_CHECK_ON_CPU", False)
    torch.manual_seed(0)
    module = VQGANModule(model=dict(ch=32, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], z_channels=8,
                                    embed_dim=8, n_embed=16, resolution=8,
                                    quantizer=dict(kind="vq", restart_dead=1)),
                         loss=dict(disc_start=0, perceptual_weight=0.0, disc_ndf=8, disc_layers=1), lr=1e-3,
                         fused_adam=True)  # the accelerator default
    counter = run_steps(module, optimizers=2)  # generator and discriminator steps: 2 global steps a batch
    assert counter.steps == 4 and int(module.step) == 4
    assert counter.calls == [] and counter.library == [], (counter.calls, counter.library)


def test_the_counter_sees_a_sync():
    """The check can fail: a module that reads its loss on the host is caught, with its line."""
    module = plain(transformer())
    original = type(module).training_step

    def reads_loss(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if torch.isfinite(loss):  # the pattern that was removed from the transformer's step
            return loss
        return loss

    module.training_step = reads_loss.__get__(module)
    counter = run_steps(module, steps=2)
    assert len(counter.calls) == 2 and all("__bool__" in c for c in counter.calls)


def test_cpu_restart_check_draws_from_the_rng_only_when_a_code_is_dead():
    """On the CPU a step without a dead code leaves the global RNG where it was (the random stream does not
    depend on the check); a step with one restarts it from a vector of the batch."""
    torch.manual_seed(0)
    q = quantizers.VectorQuantizer(n_embed=4, embed_dim=2, restart_dead=2).train()
    z = torch.randn(1, 2, 2, 2)
    before = torch.get_rng_state()
    q._restart_dead_codes(z.permute(0, 2, 3, 1).reshape(-1, 2))
    assert torch.equal(torch.get_rng_state(), before)
    q.unused_steps[1] = 2  # code 1 is dead
    old = q.embedding.weight.detach().clone()
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    q._restart_dead_codes(flat)
    assert not torch.equal(torch.get_rng_state(), before)
    assert any(torch.equal(q.embedding.weight[1], row) for row in flat)
    assert torch.equal(q.embedding.weight[[0, 2, 3]], old[[0, 2, 3]]) and int(q.unused_steps[1]) == 0
