"""VQGAN under DDP with a rank whose batch is empty (issue 30 item 13): every rank takes the same collective
path, so nothing hangs; a step where no rank has a sample is skipped everywhere; the ranks stay identical."""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from t2i.lit.vqgan import VQGANModule
from tests.test_ddp_guards import two_ranks

PER_RANK, STEPS = 2, 4
EMPTY = {1: {1}, 2: {0, 1}}  # step -> ranks whose whole batch failed to decode


def module():
    torch.manual_seed(0)
    return VQGANModule(model=dict(ch=32, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], z_channels=8,
                                  embed_dim=8, n_embed=16, resolution=8,
                                  quantizer=dict(kind="vq", ema_decay=0.9, restart_dead=1)),
                       loss=dict(disc_start=0, perceptual_weight=0.0, disc_ndf=8, disc_layers=1), lr=1e-3)


def batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return [torch.rand(0 if rank in EMPTY.get(s, ()) else PER_RANK, 3, 8, 8, generator=g) * 2 - 1
            for s in range(STEPS)]


def _rank(rank: int, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      GROUP_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TORCHELASTIC_RUN_ID="vqgan")
    torch.set_num_threads(1)
    m = module()
    loader = DataLoader([{"image": b} for b in batches(rank)], batch_size=None)
    # find_unused_parameters: what t2i-train sets for manual optimization under DDP
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=pl.strategies.DDPStrategy(process_group_backend="gloo", find_unused_parameters=True),
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0)
    trainer.fit(m, train_dataloaders=loader)
    out[rank] = {"weights": {k: v.clone() for k, v in m.state_dict().items()}, "step": int(m.step)}


def test_an_empty_rank_joins_every_collective_and_ranks_stay_equal():
    got = two_ranks(_rank, 180)
    assert got[0]["step"] == got[1]["step"] == STEPS - 1  # the all-empty step is skipped on both ranks
    w0, w1 = got[0]["weights"], got[1]["weights"]
    assert set(w0) == set(w1)
    # BatchNorm running statistics are each rank's own (DDP broadcasts rank 0's at each forward)
    diff = {k: (w0[k].float() - w1[k].float()).abs().max().item() for k in w0
            if not k.endswith(("running_mean", "running_var")) and not torch.allclose(w0[k], w1[k])}
    assert not diff, diff
    init = module().state_dict()
    assert not torch.equal(w0["model.decoder.conv_out.weight"], init["model.decoder.conv_out.weight"])  # it trained
