"""Captioned grids: images land unchanged at their row and column, captions are drawn on the left."""

import pytest
import torch

from t2i.viz import captioned_rows, wrap


def test_captioned_rows_places_images_and_text():
    torch.manual_seed(0)
    images = (torch.randint(0, 256, (6, 3, 8, 10)).float() / 127.5 - 1)
    out = captioned_rows(images, ["a red circle at the top left", "一个蓝色的正方形"], per_row=3,
                         text_width=64, pad=2)
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
