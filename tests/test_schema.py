"""Input parsing shared by encode() and the evaluators."""

import pytest
from PIL import Image

from mm_embed_trl.data.inputs import to_embedding_input
from mm_embed_trl.data.schema import EmbeddingInput, split_input


def test_tuple_is_image_then_text_even_for_path_strings(tmp_path):
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    img.save(tmp_path / "red.png")
    assert split_input(("red.png", "a caption")) == ("a caption", "red.png")
    assert split_input((img, "a caption")) == ("a caption", img)
    assert split_input(("a caption", img)) == ("a caption", img)  # unambiguous: the non-str is the image
    loaded = to_embedding_input(("red.png", "a caption"), image_root=tmp_path)
    assert loaded.text == "a caption" and loaded.image.getpixel((0, 0)) == (255, 0, 0)


def test_empty_values_count_as_missing():
    assert split_input({"text": "", "image": "x.png"}) == (None, "x.png")
    with pytest.raises(ValueError, match="neither a text, an image nor a video"):
        split_input({"text": "  ", "image": ""}, where="row 7")
    with pytest.raises(ValueError, match="needs a text, an image"):
        EmbeddingInput()


def test_bad_types_and_keys():
    with pytest.raises(TypeError, match="unsupported type int"):
        split_input(3)
    with pytest.raises(ValueError, match="unknown keys"):
        split_input({"txt": "x"})
    with pytest.raises(TypeError, match="texts must be str"):
        split_input({"text": 5})
