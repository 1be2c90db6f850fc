"""Picture grids: images land (upscaled, nearest) at their row and column inside grey frames, the
reranked pick in a red one; captions are drawn on the left with a CJK font when there is one, and one
warning per process says so when there is none."""

import logging

import pytest
import torch
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen

import t2i.viz as viz
from t2i.viz import BORDER_RGB, PICK_RGB, captioned_rows, sample_grid, wrap


def test_captioned_rows_places_images_and_text():
    torch.manual_seed(0)
    images = (torch.randint(0, 256, (6, 3, 8, 10)).float() / 127.5 - 1)
    out = captioned_rows(images, ["a red circle at the top left", "一个蓝色的正方形"], per_row=3,
                         text_width=64, pad=2, min_cell=0)
    assert out.shape[:2] == (1, 3) and out.min() >= -1 and out.max() <= 1
    row_h = (out.shape[2] - 2) // 2
    for i in range(6):
        r, c = divmod(i, 3)
        top, left = 2 + r * row_h, 64 + 2 + c * 12
        assert torch.allclose(out[0, :, top:top + 8, left:left + 10], images[i], atol=1e-5)
    assert (out[0, :, 2:2 + row_h, :64] < 0.9).any()  # some ink in the caption panel
    with pytest.raises(ValueError, match="5 images for 2 captions"):
        captioned_rows(images[:5], ["a", "b"], per_row=3)


def test_wrap_english_on_words_chinese_on_characters():
    assert wrap("a red circle at the top", 10) == ["a red", "circle at", "the top"]
    assert wrap("一个蓝色的正方形", 3) == ["一个蓝", "色的正", "方形"]


def rgb(x: torch.Tensor) -> tuple:
    return tuple(int(v) for v in (x * 255).round())


@pytest.mark.parametrize("size, factor", [(16, 8), (64, 2), (200, 1)])
def test_sample_grid_upscales_frames_and_marks_the_pick(size, factor):
    torch.manual_seed(0)
    images = torch.rand(5, 3, size, size)
    out = sample_grid(images, nrow=3, min_cell=128, border=3, marked=[0, 17])  # 17: no such cell, ignored
    cell = size * factor
    assert out.shape == (3, 2 * (cell + 3) + 3, 3 * (cell + 3) + 3)
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 3 + r * (cell + 3), 3 + c * (cell + 3)
        want = images[i].repeat_interleave(factor, 1).repeat_interleave(factor, 2)
        assert torch.allclose(out[:, y:y + cell, x:x + cell], want, atol=0.5 / 255 + 1e-6)
        mid = cell // 2
        for yy, xx in ((y - 1, x + mid), (y + cell, x + mid), (y + mid, x - 1), (y + mid, x + cell),
                       (y - 3, x - 3), (y + cell + 2, x + cell + 2)):
            # frames are shared between neighbours: red wherever the pick's (cell 0's) frame reaches
            frame = PICK_RGB if yy < cell + 6 and xx < cell + 6 else BORDER_RGB
            assert rgb(out[:, yy, xx]) == frame, (i, yy, xx)
    assert rgb(out[:, -2, -2]) == BORDER_RGB  # the empty sixth slot
    assert sample_grid(images, nrow=3, min_cell=0, border=0).shape == (3, 2 * size, 3 * size)


def test_captioned_rows_upscale_and_mark():
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    out = captioned_rows(images, ["red", "blue"], per_row=2, text_width=40, pad=2, min_cell=32, marked=[1, None])
    row_h = (out.shape[2] - 2) // 2
    assert row_h == 32 + 2 and out.shape[3] == 40 + 2 * (32 + 2) + 2
    px = ((out[0] + 1) / 2)
    left1 = 40 + 2 + 34  # row 0, column 1: the pick
    assert rgb(px[:, 2 + 16, left1 - 1]) == PICK_RGB and rgb(px[:, 2 + 16, left1 - 2]) == PICK_RGB
    assert rgb(px[:, 2 + row_h + 16, left1 - 1]) == BORDER_RGB  # row 1 has no pick
    want = ((images[1] + 1) / 2).repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.allclose(px[:, 2:34, left1:left1 + 32], want, atol=0.5 / 255 + 1e-6)


def make_font(path, chars: str) -> str:
    """A real TrueType font whose only glyphs are ``chars``, each drawn as a filled square."""
    names = [".notdef"] + [f"uni{ord(c):04X}" for c in chars]
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({ord(c): f"uni{ord(c):04X}" for c in chars})
    glyphs = {}
    for name in names:
        pen = TTGlyphPen(None)
        if name != ".notdef":
            pen.moveTo((100, 0))
            pen.lineTo((100, 800))
            pen.lineTo((900, 800))
            pen.lineTo((900, 0))
            pen.closePath()
        glyphs[name] = pen.glyph()
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({n: (1000, 0) for n in names})
    fb.setupHorizontalHeader(ascent=900, descent=-100)
    fb.setupNameTable({"familyName": "T2ITest", "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=900, usWinAscent=900, usWinDescent=100)
    fb.setupPost()
    fb.save(str(path))
    return str(path)


@pytest.fixture
def fresh_fonts(monkeypatch):
    """No system CJK font, no $T2I_FONT, and the font caches and once-only warnings reset."""
    monkeypatch.setattr(viz, "_system_fonts", lambda: [])
    monkeypatch.delenv("T2I_FONT", raising=False)

    def reset():
        viz.find_cjk_font.cache_clear()
        viz.font.cache_clear()
        viz._warned.clear()

    reset()
    yield reset
    reset()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "t2i.viz" and r.levelno == logging.WARNING]


def test_no_cjk_font_warns_once_and_only_for_chinese(fresh_fonts, caplog):
    images = torch.zeros(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="t2i.viz"):
        captioned_rows(images, ["a red circle", "a blue square"], per_row=1)
        assert warnings_of(caplog) == []
        for _ in range(3):
            captioned_rows(images, ["一个红色的圆形", "a blue square"], per_row=1)
    warned = warnings_of(caplog)
    assert len(warned) == 1 and warned[0].startswith("no CJK font found: Chinese captions")
    assert "T2I_FONT=" in warned[0]


def test_t2i_font_is_used_when_it_has_chinese_glyphs(fresh_fonts, tmp_path, monkeypatch, caplog):
    cjk = make_font(tmp_path / "cjk.ttf", "中文一个蓝色的正方形")
    latin = make_font(tmp_path / "latin.ttf", "abc")
    images = torch.zeros(1, 3, 8, 8)
    caption = ["一个蓝色的正方形"]
    fallback = captioned_rows(images, caption, per_row=1, min_cell=0)
    caplog.clear()
    fresh_fonts()
    monkeypatch.setenv("T2I_FONT", cjk)
    with caplog.at_level(logging.WARNING, logger="t2i.viz"):
        drawn = captioned_rows(images, caption, per_row=1, min_cell=0)
    assert viz.find_cjk_font() == cjk and viz.font(14).path == cjk and warnings_of(caplog) == []
    ink = (drawn[0, :, :, :160] < 0).all(0).sum()  # the square glyphs: a solid dark block per character
    assert ink > 8 * 0.5 * 14 * 14 and not torch.equal(drawn, fallback)
    # a font without Chinese glyphs in $T2I_FONT: said once, then the search goes on (and finds none)
    fresh_fonts()
    monkeypatch.setenv("T2I_FONT", latin)
    with caplog.at_level(logging.WARNING, logger="t2i.viz"):
        captioned_rows(images, caption, per_row=1)
        captioned_rows(images, caption, per_row=1)
    warned = warnings_of(caplog)
    assert len(warned) == 2 and warned[0] == f"T2I_FONT={latin} is not a readable font with Chinese glyphs; " \
        "looking for a system CJK font instead"
    assert warned[1].startswith("no CJK font found")
