"""load_image: every accepted value kind, and error messages that name the row and the fix."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mm_embed_trl.data.images import ImageLoadError, load_image, load_images


def _pixels(seed: int = 0, size=(5, 7)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


@pytest.fixture
def png(tmp_path):
    """A small PNG on disk at tmp_path/imgs/a.png, with its known pixels."""
    pixels = _pixels()
    (tmp_path / "imgs").mkdir()
    path = tmp_path / "imgs" / "a.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


@pytest.mark.parametrize("value", [None, "", "   ", {"bytes": None, "path": None}, {"bytes": None, "path": ""}, b""])
def test_missing_values_mean_no_image(value):
    assert load_image(value) is None


def test_relative_path_resolved_against_image_root(png, tmp_path):
    path, pixels = png
    image = load_image("imgs/a.png", tmp_path)
    assert image.mode == "RGB" and image.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_absolute_path_ignores_image_root(png, tmp_path):
    path, pixels = png
    np.testing.assert_array_equal(np.asarray(load_image(str(path), tmp_path / "elsewhere")), pixels)
    np.testing.assert_array_equal(np.asarray(load_image(path)), pixels)  # os.PathLike


def test_relative_path_falls_back_to_cwd(png, tmp_path, monkeypatch):
    _, pixels = png
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(np.asarray(load_image("imgs/a.png")), pixels)
    # a wrong image_root still finds the file through the working directory
    np.testing.assert_array_equal(np.asarray(load_image("imgs/a.png", tmp_path / "nope")), pixels)


def test_pil_bytes_dict_and_array_inputs(png):
    path, pixels = png
    data = path.read_bytes()
    expected = pixels
    assert np.array_equal(np.asarray(load_image(Image.fromarray(pixels))), expected)
    assert np.array_equal(np.asarray(load_image(data)), expected)
    assert np.array_equal(np.asarray(load_image(bytearray(data))), expected)
    assert np.array_equal(np.asarray(load_image({"bytes": data, "path": "ignored.png"})), expected)
    # undecoded datasets.Image value that only carries a path, resolved with image_root
    assert np.array_equal(np.asarray(load_image({"bytes": None, "path": "a.png"}, path.parent)), expected)
    assert np.array_equal(np.asarray(load_image(pixels)), expected)


def test_datasets_image_column_values(png, tmp_path):
    """Both the decoded (PIL) and the undecoded ({'bytes','path'}) values of a datasets.Image column load."""
    import datasets

    path, pixels = png
    ds = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image())
    decoded = ds[0]["image"]
    assert isinstance(decoded, Image.Image)
    np.testing.assert_array_equal(np.asarray(load_image(decoded)), pixels)
    raw = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert set(raw) == {"bytes", "path"}
    np.testing.assert_array_equal(np.asarray(load_image(raw, tmp_path)), pixels)


def test_converts_to_rgb_and_keeps_mode_when_asked():
    gray = Image.fromarray(np.array([[0, 128], [255, 7]], dtype=np.uint8), mode="L")
    rgb = load_image(gray)
    assert rgb.mode == "RGB"
    # L -> RGB repeats the grey value on the three channels
    np.testing.assert_array_equal(np.asarray(rgb), np.repeat(np.asarray(gray)[..., None], 3, axis=2))
    assert load_image(gray, convert_rgb=False).mode == "L"
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), np.full((2, 2, 3), [10, 20, 30]))


def test_palette_with_transparency_converts_without_warning(tmp_path, recwarn):
    img = Image.new("P", (3, 3), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.info["transparency"] = b"\x00\x80"  # transparency given in bytes: PIL warns on a direct P->RGB
    img.save(tmp_path / "p.png", transparency=b"\x00\x80")
    out = load_image("p.png", tmp_path)
    np.testing.assert_array_equal(np.asarray(out), np.full((3, 3, 3), [200, 100, 50]))
    assert not [w for w in recwarn if "Palette" in str(w.message)]


def test_file_handle_closed_and_pixels_loaded(png, tmp_path):
    path, pixels = png
    image = load_image("imgs/a.png", tmp_path)
    path.unlink()  # the image must not depend on the file any more
    np.testing.assert_array_equal(np.asarray(image.copy()), pixels)
    assert getattr(image, "fp", None) is None


def test_missing_file_error_names_row_path_root_and_fix(tmp_path):
    where = "row 12, column 'qry_image_path'"
    with pytest.raises(ImageLoadError) as info:
        load_image("images/missing.jpg", tmp_path, where=where)
    message = str(info.value)
    assert where in message
    assert str(tmp_path / "images" / "missing.jpg") in message
    assert str(tmp_path) in message
    assert "--image_root" in message
    assert isinstance(info.value, ValueError)


def test_missing_file_without_root_suggests_image_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageLoadError, match=r"row 3.*missing\.png.*--image_root"):
        load_image("missing.png", where="row 3")


def test_corrupt_file_error_names_file_and_row(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError) as info:
        load_image("bad.png", tmp_path, where="row 5, column 'pos_image_path'")
    assert "row 5, column 'pos_image_path'" in str(info.value)
    assert str(bad) in str(info.value)
    assert "valid image" in str(info.value)


def test_truncated_file_is_reported_at_load_time(png, tmp_path):
    path, _ = png
    big = tmp_path / "big.png"
    Image.fromarray(_pixels(1, (64, 64))).save(big)
    big.write_bytes(big.read_bytes()[:200])  # header intact, data cut: fails only when decoding pixels
    with pytest.raises(ImageLoadError, match="big.png"):
        load_image(big, where="row 0")


def test_corrupt_bytes_error(tmp_path):
    with pytest.raises(ImageLoadError, match=r"row 1.*bytes"):
        load_image(b"garbage", where="row 1")


def test_url_and_unsupported_types():
    with pytest.raises(ImageLoadError, match="URL"):
        load_image("https://example.com/a.png", where="row 0")
    with pytest.raises(TypeError, match=r"row 2.*int"):
        load_image(42, where="row 2")
    with pytest.raises(TypeError, match="unknown keys"):
        load_image({"url": "x"})


def test_load_images_reports_item_index(png, tmp_path):
    _, pixels = png
    out = load_images(["imgs/a.png", "", None], tmp_path, where_prefix="negatives")
    assert out[1] is None and out[2] is None
    np.testing.assert_array_equal(np.asarray(out[0]), pixels)
    with pytest.raises(ImageLoadError, match="negatives #1"):
        load_images(["imgs/a.png", "imgs/none.png"], tmp_path, where_prefix="negatives")


def test_in_memory_encoded_pil_is_decoded_eagerly():
    buf = io.BytesIO()
    Image.fromarray(_pixels(3)).save(buf, format="PNG")
    lazy = Image.open(io.BytesIO(buf.getvalue()))  # PIL opens lazily: pixels not read yet
    np.testing.assert_array_equal(np.asarray(load_image(lazy)), _pixels(3))


def test_image_identity_is_cheap_for_paths_and_content_based_otherwise():
    from PIL import Image

    from mm_embed_trl.data.images import image_identity

    assert image_identity("images/a.png") == image_identity({"path": "images/a.png", "bytes": b"ignored"})
    assert image_identity("images/a.png") != image_identity("images/b.png")
    assert image_identity(None) == image_identity("") == ""
    red, red2, blue = (Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (255, 0, 0), (0, 0, 255)))
    assert image_identity(red) == image_identity(red2) != image_identity(blue)
    assert image_identity(b"\x01\x02") == image_identity({"bytes": b"\x01\x02"}) != image_identity(b"\x01")


@pytest.mark.parametrize("source", ["file", "bytes"])
def test_decompression_bomb_says_what_it_is_and_how_to_lift_the_limit(source, tmp_path, monkeypatch):
    """PIL refuses images over 2x Image.MAX_IMAGE_PIXELS; that used to be reported as a possibly corrupt file."""
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)  # 1200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 > 2 x 500: DecompressionBombError
    value = str(path) if source == "file" else path.read_bytes()
    with pytest.raises(ImageLoadError) as info:
        load_image(value, where="row 3, column 'qry_img_path'")
    message = str(info.value)
    assert "row 3, column 'qry_img_path'" in message and "truncated or corrupt" not in message
    assert "1200 pixels" in message and "PIL.Image.MAX_IMAGE_PIXELS" in message and "500" in message
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # what the message says lifts it
    assert load_image(value).size == (40, 30)
