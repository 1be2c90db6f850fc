"""Label maps + images for semantic image synthesis (SPADE): the Shapes layouts (:mod:`.shapes`), the folder
sources (:mod:`.sources`) and the datamodule (:mod:`.datamodule`); every name is importable from here.

Two kinds of source:

* **Shapes layouts**: one or more Shapes objects per image, each in its own cell of the 3x3 grid (so they never
  overlap), drawn with the Shapes renderer, and beside each image its class map: background 0, and each object's
  pixels (coverage >= 1/2) ``1 + colour_index * 4 + shape_index`` (6 colours x 4 shapes + background = 25
  classes); objects are Shapes' ``large`` size unless ``sizes`` says otherwise (a ``small`` one is ~5 px at
  32 px, too small for its map to show its shape). The map fixes every object's colour, shape and position, so :func:`t2i.data.oracle.layout_accuracy`
  can check all three on a generated image. Deterministic given ``seed``; splits ``train`` / ``val`` / ``test``.
  Written by ``t2i-data shapes_layout`` as ``<output>/<split>/images/*.png``, ``<split>/labels/*.png`` (uint8
  class ids) and ``<split>/specs.jsonl``.
* **Folder readers** in the layouts of the public datasets, image and label matched by file stem:

  - ``ade20k``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` +
    ``annotations/{training,validation}/*.png``; ids used as they are (0 = unlabeled, 1..150): 151 classes.
  - ``coco_stuff``: ``train2017/*.jpg`` + ``stuffthingmaps_trainval2017/train2017/*.png`` (and ``val2017``);
    the maps hold 0..181 (COCO's 182 thing + stuff ids minus one) and 255 = unlabeled. We shift by one:
    ``255 -> 0`` (unlabeled), ``v -> v + 1``: 183 classes. Instance maps are optional: ``instance_dir``
    (``<stem>.png``, any integer ids, e.g. rendered from the panoptic annotations); the panoptic / instances JSON
    files themselves are not read.
  - ``cityscapes``: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` +
    ``gtFine/{train,val}/<city>/*_gtFine_labelIds.png`` (ids 0..33, 0 = unlabeled; 35 classes as in SPADE) and
    ``*_gtFine_instanceIds.png`` (``class * 1000 + k`` for things, the class id elsewhere).
  - ``shapes_layout``: the folders ``t2i-data shapes_layout`` writes; ``label_folder``: any ``image_dir`` +
    ``label_dir`` pair (``ignore_label`` mapped to 0, ``label_offset`` added to the rest).

  A missing partner is counted when the folders are indexed; an undecodable image or map, an image and map of
  different sizes, or a class id outside ``0..num_classes-1`` when the pair is loaded. Every one is skipped and
  counted in a :class:`LayoutSkipLog` (a :class:`~t2i.data.skips.SkipLog` with the reasons below); past
  ``max_bad_fraction`` the run stops with one clear :class:`~t2i.data.skips.DataError`.

:class:`LabelMapDataModule` turns any of them into batches: ``image`` float [B, 3, H, W] in [-1, 1], ``label`` long
[B, H, W], ``instance`` long [B, H, W] (``has_instances`` only) and ``key``. Images and maps are resized together
(bicubic for the image, NEAREST for the maps) so the shorter side fits, then cropped to ``image_size`` x
``image_size * aspect_ratio`` (random crop and horizontal flip in training, centre crop otherwise).
"""

from t2i.data.layouts.datamodule import (  # noqa: F401
    LabelMapDataModule,
    LabelMapPairs,
    collate_pairs,
    finish_batch,
    image_hw,
)
from t2i.data.layouts.shapes import (  # noqa: F401
    JITTER,
    LAYOUT_SALT,
    LAYOUT_SIZES,
    LAYOUT_SPLITS,
    NUM_LAYOUT_CLASSES,
    LayoutObject,
    LayoutSample,
    LayoutSpec,
    class_attributes,
    iter_layouts,
    layout_class,
    make_layouts,
    read_specs,
    render_layout,
    sample_layout,
    write_shapes_layout,
)
from t2i.data.layouts.sources import (  # noqa: F401
    ADE_SPLITS,
    BAD_LABEL,
    ID_MAP_MODES,
    LABEL_OUT_OF_RANGE,
    LAYOUT_REASONS,
    MISSING_INSTANCE,
    MISSING_LABEL,
    SIZE_MISMATCH,
    SOURCES,
    STAGES,
    LabelFolder,
    LayoutSkipLog,
    Pair,
    _root,
    ade20k_source,
    cityscapes_source,
    coco_stuff_source,
    fit_pair,
    label_folder_source,
    open_label_source,
    read_id_map,
    resize_nearest,
    shapes_layout_source,
)
