"""Layout fidelity of a SPADE checkpoint on Shapes layouts: the oracle reads every generated image and checks each
object's colour, shape and position against its map (t2i.data.oracle.layout_accuracy), for the deterministic
style (z = 0), the real image's style and several random styles; plus the mean pairwise pixel distance between
the random styles of one map. The real test images are scored too (the oracle's own ceiling).

    python experiments/spade/eval_layouts.py <ckpt> [--data <shapes_layout root>] [--split test] [--styles 3]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from t2i.data.layouts import LabelMapDataModule
from t2i.data.oracle import layout_accuracy
from t2i.lit.spade import SPADEModule


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--data", required=True, help="the shapes_layout root (data.root of the training run)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--styles", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    module = SPADEModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    size = module.sampling_generator().size[0]
    dm = LabelMapDataModule(source="shapes_layout", root=args.data, image_size=size, num_classes=module.num_classes,
                            batch_size=args.batch, num_workers=0, random_flip=False, random_crop=False, seed=0)
    dm.setup("test" if args.split == "test" else "validate")
    loader = dm.test_dataloader() if args.split == "test" else dm.val_dataloader()
    out: dict[str, list] = {"real": [], "z0": [], "own_style": []} | {f"random{i}": [] for i in range(args.styles)}
    labels, dist = [], []
    gen = torch.Generator().manual_seed(0)
    for batch in loader:
        batch = dm.on_after_batch_transfer(batch, 0)
        label, real = batch["label"], batch["image"]
        labels += list(label)
        out["real"].append(real)
        out["z0"].append(module.generate(label))
        if module.encoder is not None:
            out["own_style"].append(module.generate(label, style=real))
            rnd = [module.generate(label, style="random", generator=gen) for _ in range(args.styles)]
            for i, r in enumerate(rnd):
                out[f"random{i}"].append(r)
            dist += [(a - b).abs().mean(dim=(1, 2, 3)) for a, b in itertools.combinations(rnd, 2)]
    report = {}
    for name, chunks in out.items():
        if chunks:
            acc = layout_accuracy(torch.cat(chunks), labels)
            report[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in acc.items()}
    if dist:  # mean |x_i - x_j| over pixels in [-1, 1], over map and style pairs
        report["style_pairwise_l1"] = round(float(torch.cat(dist).mean()), 4)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
