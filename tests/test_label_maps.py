"""Label maps in every PIL mode: the id maps t2i reads, and every other image skipped, counted and named.

A valid id map is one frame of one channel of integer ids: ``L`` (8-bit), ``I;16`` (16-bit), ``I`` (32-bit),
``1`` (bilevel: ids 0 and 1) or ``P``, read by its palette indices (the palette's colours are ignored). Every
other image (grey + alpha, colour, CMYK, float, several frames) is a ``bad_label`` whose reason names its mode,
through both readers: t2i-synthesize's ``load_maps`` and the SPADE datamodule's ``LabelFolder`` / dataset.
PNG holds only some of these modes, so the others are written as TIFF or GIF under a ``.png`` name (PIL opens a
file by its content, as a user's mislabelled file would be).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from t2i.cli.synthesize import load_maps
from t2i.data.layouts import (
    BAD_LABEL,
    LABEL_OUT_OF_RANGE,
    LabelFolder,
    LabelMapPairs,
    LayoutSkipLog,
    read_id_map,
)
from t2i.data.skips import BadSample

H, W = 6, 8
IDS = (np.arange(H * W).reshape(H, W) % 5).astype(np.uint8)  # ids 0..4


def save(image: Image.Image, path, fmt: str = "PNG", **kw):
    image.save(path, fmt, **kw)
    return path


def palette_map() -> Image.Image:
    im = Image.fromarray(IDS, "L").convert("P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9, 200, 100, 50] + [0] * (3 * 251))
    im.frombytes(IDS.tobytes())  # the indices are the ids, whatever the colours
    return im


VALID = {  # name -> (writer, the ids read back)
    "L": (lambda p: save(Image.fromarray(IDS, "L"), p), IDS),
    "P": (lambda p: save(palette_map(), p), IDS),
    "I;16": (lambda p: save(Image.fromarray(IDS.astype(np.uint16) * 3), p), IDS * 3),
    "I": (lambda p: save(Image.fromarray(IDS.astype(np.int32), "I"), p, "TIFF"), IDS),
    "1": (lambda p: save(Image.fromarray(IDS > 2), p), (IDS > 2).astype(np.uint8)),
}

BAD = {  # name -> (writer, text the reason must hold)
    "LA": (lambda p: save(Image.fromarray(np.stack([IDS, IDS], -1), "LA"), p), "LA"),
    "PA": (lambda p: save(palette_map().convert("PA"), p, "TIFF"), "PA"),
    "RGB": (lambda p: save(Image.fromarray(np.stack([IDS] * 3, -1), "RGB"), p), "RGB"),
    "RGBA": (lambda p: save(Image.fromarray(np.stack([IDS] * 4, -1), "RGBA"), p), "RGBA"),
    "CMYK": (lambda p: save(Image.fromarray(np.stack([IDS] * 4, -1), "RGBA").convert("CMYK"), p, "TIFF"), "CMYK"),
    "F": (lambda p: save(Image.fromarray(IDS.astype(np.float32), "F"), p, "TIFF"), "F"),
    "YCbCr": (lambda p: save(Image.new("YCbCr", (W, H)), p, "TIFF"), "YCbCr"),
    "APNG": (lambda p: save(Image.fromarray(IDS, "L"), p, save_all=True,
                            append_images=[Image.fromarray(IDS[::-1].copy(), "L")]), "2 frames"),
    "GIF": (lambda p: save(palette_map(), p, "GIF", save_all=True, append_images=[palette_map().rotate(180)]),
            "2 frames"),
    "TIFF pages": (lambda p: save(Image.fromarray(IDS, "L"), p, "TIFF", save_all=True,
                                  append_images=[Image.fromarray(IDS, "L")]), "2 frames"),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_id_maps_read_as_their_ids(tmp_path, name):
    write, ids = VALID[name]
    arr = read_id_map(write(tmp_path / "m.png"))
    assert arr.shape == (H, W) and np.issubdtype(arr.dtype, np.integer)
    assert np.array_equal(arr, ids)
    stems, labels, _, slog = load_maps(tmp_path, num_classes=16, size=(2 * H, 2 * W))  # NEAREST-resized
    assert stems == ["m"] and slog.n_bad == 0
    assert np.array_equal(labels[0].numpy(), np.repeat(np.repeat(ids, 2, 0), 2, 1))


@pytest.mark.parametrize("name", list(BAD))
def test_every_other_image_is_a_bad_label_naming_its_mode(tmp_path, name):
    write, what = BAD[name]
    maps = tmp_path / "maps"
    maps.mkdir()
    VALID["L"][0](maps / "a_good.png")
    bad = write(maps / "b_bad.png")
    with pytest.raises(BadSample) as e:
        read_id_map(bad)
    assert e.value.reason == BAD_LABEL and what in e.value.detail, e.value

    # t2i-synthesize: counted, the others kept, the summary names the file and the mode
    for size in (None, (2 * H, 2 * W)):  # resized or not: no traceback from the resize either
        stems, labels, _, slog = load_maps(maps, num_classes=16, size=size, max_bad_fraction=0.5)
        assert stems == ["a_good"] and slog.n_ok == 1 and dict(slog.by_reason) == {BAD_LABEL: 1}
        assert str(bad) in slog.summary() and what in slog.summary()

    # the SPADE datamodule's reader and dataset
    images = tmp_path / "images"
    images.mkdir()
    for stem in ("a_good", "b_bad"):
        Image.new("RGB", (W, H)).save(images / f"{stem}.png")
    src = LabelFolder(images, maps, num_classes=16)
    slog = LayoutSkipLog()
    pairs = src.pairs(slog)
    assert [p.key for p in pairs] == ["a_good", "b_bad"] and slog.n_bad == 0
    with pytest.raises(BadSample) as e:
        src.load(pairs[1])
    assert e.value.reason == BAD_LABEL and what in e.value.detail
    ds = LabelMapPairs(src, pairs, H, W, train=False)
    assert ds[0]["label"].shape == (H, W) and ds[1] == {"bad": (BAD_LABEL, str(bad))}


def test_ids_past_num_classes_in_a_16_bit_map_are_out_of_range_naming_the_depth(tmp_path):
    Image.fromarray(np.full((H, W), 300, dtype=np.uint16)).save(tmp_path / "deep.png")
    VALID["L"][0](tmp_path / "ok.png")
    stems, _, _, slog = load_maps(tmp_path, num_classes=25, size=None, max_bad_fraction=0.5)
    assert stems == ["ok"] and dict(slog.by_reason) == {LABEL_OUT_OF_RANGE: 1}
    assert "16-bit" in slog.summary() and "300..300" in slog.summary()
