"""t2i-eval: benchmark numbers from one command, with the protocol written down.

    t2i-eval eval=shapes ckpt=<transformer .ckpt> clip.ckpt=<clip .ckpt>
    t2i-eval eval=muge ckpt=... clip.backend=cn_clip clip.model_name=ViT-B-16 clip.ckpt=clip_cn_vit-b-16.pt
    t2i-eval eval=coco30k ckpt=... metrics.feature_extractor_weights_path=weights-inception-2015-12-05-6726825d.pth
    t2i-eval eval=reconstruction tokenizer_ckpt=<vqgan .ckpt>
    t2i-eval eval=spade ckpt=<spade .ckpt>
    t2i-eval eval=shapes_caption ckpt=<transformer .ckpt with captioning>    (also muge_caption, coco_cn_caption)

Protocols live in ``conf/eval/``. Generation protocols draw ``num_candidates`` samples per caption,
keep CLIP's best (or the first drawn without a CLIP; ``rerank.backend=caption``: the best by the caption's
likelihood given the codes under the transformer itself; ``rerank.combine=rank_sum|zsum``: by both, see
:mod:`t2i.pipeline.caption_rerank`), and score the chosen images (every candidate's scores in ``rerank_scores.jsonl``;
on Shapes, ``acc_by``: the oracle's accuracy under each available ranking and the best-of-n ceiling); ``shapes`` adds
the oracle's attribute accuracy of the first and of the chosen sample on ``test`` and
``compositional`` (``shapes_kg``: on ``test``, seen objects, and ``kg_heldout``, objects known only
through the knowledge graph; a model with knowledge gets its prompts linked with the lexicon its
checkpoint carries); ``reconstruction`` scores an image tokenizer (rFID, PSNR, SSIM, LPIPS, codebook
use). Output in ``output`` (the Hydra run folder by default): ``metrics.json`` (numbers plus
everything needed to reproduce them: versions, checkpoints and extractor weights hashes, resize,
counts, seeds), ``metrics.md`` (a markdown row), ``samples.png`` / ``reconstructions.png``, and a
printed table beside the protocol's published anchors.

Several processes (``torchrun --nproc_per_node=8 -m t2i.cli.evaluate ...`` or ``srun`` with one task
per GPU) share the work: caption batch ``k`` goes to rank ``k % world_size`` (each batch seeded by its
position, so the numbers do not depend on the number of processes), metric states and the oracle's
counts are gathered on rank 0, which writes the outputs. ``autocast`` (``auto``: bf16 on CUDA, off on
the CPU; ``bf16`` | ``fp16`` | ``null``) covers sampling, decoding, CLIP and the Inception extractors.
"""

from __future__ import annotations

import json
import time

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict

from t2i.cli.common import clear_errors
from t2i.devices import pick_device
from t2i.errors import ConfigError
from t2i.eval.benchmarks import generation, table
from t2i.eval.items import RESIZE, shapes_items  # noqa: F401 (read here by tests)
from t2i.eval.processes import autocast_dtype, rank_world, slurm_to_torchrun_env, start_processes, versions
from t2i.eval.reconstruction import reconstruction


def run(cfg: DictConfig) -> dict:
    p = cfg.eval
    if p.kind not in ("generation", "shapes", "reconstruction", "spade", "caption"):
        raise ConfigError(f"eval.kind={p.kind!r}: use generation, shapes, reconstruction, spade or caption")
    if p.kind == "spade" and not cfg.ckpt:
        raise ConfigError("eval=spade needs ckpt=<a t2i-train experiment=*_spade .ckpt>")
    if p.kind != "reconstruction" and not cfg.ckpt:
        raise ConfigError(f"eval={p.name} needs ckpt=<a t2i-train experiment=*_transformer .ckpt>")
    from t2i.data.prompts import check_output_folder
    from t2i.eval.checks import check_keys

    check_keys(cfg)
    out = check_output_folder(cfg.output)
    torch.set_flush_denormal(True)
    slurm_to_torchrun_env()
    device = pick_device(str(cfg.device))
    autocast_dtype(cfg, device)  # a bad value fails before any model loads
    out.mkdir(parents=True, exist_ok=True)
    cfg.output = str(out)
    started = start_processes(device)
    try:
        t0 = time.perf_counter()
        if p.kind == "spade":
            from t2i.eval.spade import spade  # label maps -> images

            result = spade(cfg, device)
        elif p.kind == "caption":
            from t2i.eval.captioning import captioning  # images -> captions

            result = captioning(cfg, device)
        else:
            result = reconstruction(cfg, device) if p.kind == "reconstruction" else generation(cfg, device)
        wall = time.perf_counter() - t0
        rank, world = rank_world()
        if world > 1:
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
    result.update(protocol_name=p.name, wall_seconds=wall, device=str(device),
                  seed=int(cfg.seed), caption_seed=int(p.caption_seed), resize=RESIZE, versions=versions(),
                  metrics_config=OmegaConf.to_container(cfg.metrics, resolve=True),
                  overrides=list(cfg.get("overrides") or []))
    result["protocol"].update(OmegaConf.to_container(p, resolve=True))
    if rank != 0:
        return result  # rank 0 writes the outputs
    (out / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    text = table(cfg, result["summary"])
    (out / "metrics.md").write_text(text.splitlines()[0] + "\n" + text.splitlines()[1] + "\n"
                                    + text.splitlines()[2] + "\n")
    print(f"t2i-eval {p.name}: {result['wall_seconds']:.1f} s on {device}; output in {out}\n{text}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@clear_errors
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    OmegaConf.resolve(cfg)
    with open_dict(cfg):
        cfg.overrides = overrides
    run(cfg)


if __name__ == "__main__":
    main()
