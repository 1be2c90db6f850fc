#!/usr/bin/env bash
# The study behind the demo's defaults (README.md here): every choice made on `val`; test and compositional
# are measured once, by `make demo` with the chosen defaults. Run from the repository root; each sweep leaves
# its jobs and `t2i-sweep-report`'s report.md / report.png under outputs/sweeps/<name>. Two sweeps can run side
# by side, a core each (taskset -c 0 / -c 1): the demo gives each stage the cores it may use.
set -euo pipefail
T2I=${T2I:-.venv/bin}
export WANDB_MODE=offline WANDB_SILENT=true
# The data budget: 20,000 training images instead of 5,000, and the VQGAN at the same 3,125 updates.
BASE="shapes.n_train=20000 vqgan.max_epochs=2 +vqgan.set.trainer.max_steps=3125 clip.max_epochs=5 eval.splits=[val] eval.num_captions=500 reconstruction.split=val"

# 1. The VQGAN: how many updates, at which batch (only the VQGAN and its reconstruction eval run).
$T2I/t2i-demo -m hydra.sweep.dir=outputs/sweeps/vqgan "stages=[reconstruction]" reconstruction.split=val \
  optimized_metric=reconstruction/oracle_all shapes.n_train=20000 vqgan.max_epochs=1 +vqgan.set.data.batch_size=8,16
$T2I/t2i-sweep-report outputs/sweeps/vqgan --metrics reconstruction/psnr tokenizer/psnr

# 2. The base every later trial reuses: the whole chain with 20,000 training images, evaluated on val.
$T2I/t2i-demo output=outputs/sweeps/base20k $BASE transformer.max_epochs=5 +eval.set.sample.cfg_scale=1.3

# 3. The transformer's length (its updates against the time budget); the CLIP and the tokenizer are reused.
for e in 3 4; do
  $T2I/t2i-demo -m hydra.sweep.dir=outputs/sweeps/transformer hydra.sweep.subdir=epochs_$e reuse=outputs/sweeps/base20k \
    $BASE +eval.set.sample.cfg_scale=1.3 optimized_metric=val/acc_first transformer.max_epochs=$e
done
$T2I/t2i-sweep-report outputs/sweeps/transformer --metric val/acc_first

# 4. The sampler (Optuna, TPE): top-k, temperature and guidance; only the evaluation reruns.
$T2I/t2i-demo -m hydra.sweep.dir=outputs/sweeps/sampling hparams_search=demo_optuna reuse=outputs/sweeps/base20k \
  $BASE transformer.max_epochs=5 hydra.sweeper.n_trials=8
$T2I/t2i-sweep-report outputs/sweeps/sampling
