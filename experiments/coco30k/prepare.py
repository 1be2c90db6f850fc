"""Write MS-COCO val2014 captions next to their images as same-stem ``.txt`` files (one caption a
line), the layout the ``folder`` reader and ``t2i-eval eval=coco30k`` read.

    python experiments/coco30k/prepare.py data/coco2014/annotations/captions_val2014.json data/coco2014/val2014
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def prepare(annotations: Path, image_dir: Path) -> dict:
    data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    files = {im["id"]: im["file_name"] for im in data["images"]}
    captions = defaultdict(list)
    for a in data["annotations"]:
        text = " ".join(str(a["caption"]).split())
        if text:
            captions[a["image_id"]].append(text)
    written = missing = 0
    for image_id, name in files.items():
        image = Path(image_dir) / name
        if not image.is_file():
            missing += 1
            continue
        image.with_suffix(".txt").write_text("\n".join(captions[image_id]) + "\n", encoding="utf-8")
        written += 1
    return {"images": len(files), "written": written, "missing_images": missing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("annotations", type=Path)
    ap.add_argument("image_dir", type=Path)
    args = ap.parse_args()
    print(prepare(args.annotations, args.image_dir))


if __name__ == "__main__":
    main()
