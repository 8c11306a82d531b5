"""load_image: every accepted value kind, and error messages that name the row and the fix."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
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
    # a fully transparent pixel shows the white background, not its hidden colour
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), np.full((2, 2, 3), 255))


def test_palette_with_transparency_converts_without_warning(tmp_path, recwarn):
    img = Image.new("P", (3, 3), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.info["transparency"] = b"\x00\x80"  # transparency given in bytes: PIL warns on a direct P->RGB
    img.save(tmp_path / "p.png", transparency=b"\x00\x80")
    out = load_image("p.png", tmp_path)
    # index 1 has alpha 0x80 = 128: composited over white, 128/255 of (200, 100, 50) + 127/255 of 255
    expected = np.round(np.array([200, 100, 50]) * 128 / 255 + 255 * 127 / 255)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(expected, (3, 3, 3)), atol=1, rtol=0)
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

    assert image_identity("images/a.png") == image_identity({"path": "images/a.png", "bytes": None})
    # embedded images: datasets keeps only the file's base name, so the bytes say which image it is
    first, second = {"path": "image.jpg", "bytes": b"\x01"}, {"path": "image.jpg", "bytes": b"\x02"}
    assert image_identity(first) != image_identity(second)
    assert image_identity(first) == image_identity({"path": "a/b.jpg", "bytes": b"\x01"})
    assert image_identity(["images/a.png", "images/b.png"]) != image_identity(["images/b.png", "images/a.png"])
    assert image_identity("images/a.png") != image_identity("images/b.png")
    assert image_identity(None) == image_identity("") == ""
    red, red2, blue = (Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (255, 0, 0), (0, 0, 255)))
    assert image_identity(red) == image_identity(red2) != image_identity(blue)
    assert image_identity(b"\x01\x02") == image_identity({"bytes": b"\x01\x02"}) != image_identity(b"\x01")


# ------------------------------------------------------------------------------------ every PIL mode -> 8-bit RGB
# Each case: (mode, source image, expected RGB pixels computed here with numpy from the documented formulas, not
# by PIL). Alpha is composited over white: out = a * c + (1 - a) * 255 with a = alpha / 255 (rounding: +-1).
_GREY = np.array([[0, 1, 128], [200, 254, 255]], dtype=np.uint8)
_RGB = np.random.default_rng(7).integers(0, 256, size=(2, 3, 3), dtype=np.uint8)
_ALPHA = np.array([[0, 255, 128], [64, 1, 200]], dtype=np.uint8)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return colour.astype(np.float64) * a + 255.0 * (1.0 - a)


def _grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.float64)[..., None], 3, axis=2)


def _mode_cases():
    cases = {}
    bits = np.array([[0, 1, 0], [1, 1, 0]], dtype=bool)
    cases["1"] = (Image.fromarray(bits).convert("1"), _grey3(bits * 255.0), 0)
    cases["L"] = (Image.fromarray(_GREY, mode="L"), _grey3(_GREY), 0)
    cases["LA"] = (
        Image.fromarray(np.stack([_GREY, _ALPHA], -1), mode="LA"),
        _over_white(_grey3(_GREY), _ALPHA),
        1,
    )
    cases["RGB"] = (Image.fromarray(_RGB), _RGB.astype(np.float64), 0)
    cases["RGBA"] = (Image.fromarray(np.dstack([_RGB, _ALPHA]), mode="RGBA"), _over_white(_RGB, _ALPHA), 1)
    cases["RGBA fully transparent"] = (Image.new("RGBA", (3, 2), (10, 20, 30, 0)), np.full((2, 3, 3), 255.0), 0)
    palette = np.array([[0, 0, 0], [200, 100, 50], [10, 250, 30]], dtype=np.uint8)
    index = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    p = Image.fromarray(index, mode="P")
    p.putpalette(palette.flatten().tolist())
    cases["P"] = (p, palette[index].astype(np.float64), 0)
    p_alpha = p.copy()
    p_alpha.info["transparency"] = bytes([255, 0, 128])  # per-index alpha (a PNG tRNS chunk)
    cases["P+transparency"] = (p_alpha, _over_white(palette[index], np.array([255, 0, 128])[index]), 1)
    p_key = p.copy()
    p_key.info["transparency"] = 2  # one fully transparent index (GIF style)
    cases["P+transparent index"] = (p_key, _over_white(palette[index], np.where(index == 2, 0, 255)), 0)
    cmyk = np.random.default_rng(3).integers(0, 256, size=(2, 3, 4), dtype=np.uint8)
    c, m, y, k = (cmyk[..., i] / 255.0 for i in range(4))
    cases["CMYK"] = (
        Image.frombytes("CMYK", (3, 2), cmyk.tobytes()),
        255.0 * np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], -1),
        1,
    )
    ycc = np.array([[[128, 128, 128], [200, 50, 180], [30, 200, 90]]] * 2, dtype=np.uint8)
    yy, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    red, blue = yy + 1.402 * (cr - 128), yy + 1.772 * (cb - 128)
    jfif = np.stack([red, yy - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), blue], -1)
    cases["YCbCr"] = (Image.frombytes("YCbCr", (3, 2), ycc.tobytes()), np.clip(jfif, 0, 255), 2)
    # 16-bit: the full 0..65535 range maps onto 0..255
    sixteen = np.array([[0, 257, 1000], [30000, 65278, 65535]], dtype=np.uint16)
    cases["I;16"] = (Image.fromarray(sixteen), _grey3(sixteen / 257.0), 1)
    cases["I;16B"] = (Image.frombytes("I;16B", (3, 2), sixteen.astype(">u2").tobytes()), _grey3(sixteen / 257.0), 1)
    # 32-bit integers: 16-bit data (values above 255) scaled like I;16; values within 0..255 kept as they are
    cases["I 16-bit data"] = (Image.fromarray(sixteen.astype(np.int32)), _grey3(sixteen / 257.0), 1)
    cases["I 8-bit data"] = (Image.fromarray(_GREY.astype(np.int32)), _grey3(_GREY), 0)
    # floats: 0..1 scaled to 0..255 (other ranges as for I)
    unit = np.array([[0.0, 0.25, 0.5], [0.75, 0.999, 1.0]], dtype=np.float32)
    cases["F 0..1"] = (Image.fromarray(unit), _grey3(unit * 255.0), 1)
    cases["F 16-bit data"] = (Image.fromarray(sixteen.astype(np.float32)), _grey3(sixteen / 257.0), 1)
    return cases


_MODES = _mode_cases()


@pytest.mark.parametrize("case", list(_MODES))
def test_every_pil_mode_becomes_the_expected_8_bit_rgb(case):
    image, expected, tolerance = _MODES[case]
    out = load_image(image)
    assert out.mode == "RGB" and out.size == image.size
    got = np.asarray(out).astype(np.float64)
    # tolerance: PIL rounds in 8-bit integer arithmetic (1 unit), its YCbCr matrix is a fixed-point JFIF (2 units)
    np.testing.assert_allclose(got, np.round(expected), atol=tolerance, rtol=0, err_msg=case)


@pytest.mark.parametrize("case", ["RGBA", "I;16", "LA", "P+transparency"])
def test_modes_convert_the_same_from_a_file(case, tmp_path):
    """What a PNG on disk decodes to goes through the same conversion as an in-memory image."""
    image, expected, tolerance = _MODES[case]
    image.save(tmp_path / "x.png")
    got = np.asarray(load_image("x.png", tmp_path)).astype(np.float64)
    np.testing.assert_allclose(got, np.round(expected), atol=tolerance, rtol=0)


def test_encode_inputs_from_pil_images_get_the_same_conversion():
    """`to_embedding_input` (the path of model.encode) converts user PIL images like load_image does."""
    from mm_embed_trl.data.inputs import to_embedding_input

    for case in ("RGBA", "I;16", "LA"):
        image, expected, tolerance = _MODES[case]
        got = np.asarray(to_embedding_input(image).image).astype(np.float64)
        np.testing.assert_allclose(got, np.round(expected), atol=tolerance, rtol=0, err_msg=case)


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


# ------------------------------------------------------------------ EXIF orientation, multi-frame (issue 22, 4)
def _sideways_jpeg(path, orientation=6):
    """A JPEG whose pixels are stored turned (as phones store photos) with the EXIF orientation tag that turns them
    back, and the upright image as a lossless PNG beside it: the stored pixels turned by hand (orientation 6 is
    "rotate 90 degrees clockwise to display"; 3 is 180 degrees)."""
    upright = Image.new("RGB", (48, 80), (255, 255, 255))
    upright.paste((220, 20, 20), (0, 0, 48, 20))  # a red band at the top: any turn moves it
    upright.paste((20, 20, 220), (30, 40, 48, 80))
    turn = {6: Image.Transpose.ROTATE_90, 3: Image.Transpose.ROTATE_180}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(turn).save(path, exif=exif, quality=95)
    with Image.open(path) as stored:
        undo = {6: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
        reference = stored.convert("RGB").transpose(undo)
    reference.save(path.with_suffix(".png"))
    return path, path.with_suffix(".png")


@pytest.mark.parametrize("orientation", [6, 3])
def test_exif_orientation_is_applied_however_the_image_is_given(orientation, tmp_path):
    """Phone photos embedded sideways in training and encode while the sentence-transformers export turned them."""
    from mm_embed_trl.data.images import image_size

    rotated, upright = _sideways_jpeg(tmp_path / "photo.jpg", orientation)
    expected = np.asarray(Image.open(upright))
    with Image.open(rotated) as opened:
        pil = opened.copy()
    for value in (str(rotated), rotated.read_bytes(), {"bytes": rotated.read_bytes(), "path": None},
                  {"bytes": None, "path": str(rotated)}, pil):
        image = load_image(value)
        assert image.size == (48, 80)
        np.testing.assert_array_equal(np.asarray(image), expected)
        assert image_size(value) == (80, 48)  # (height, width), from the header alone


def test_exif_orientation_in_encode_and_the_training_collator(qwen2_vl_model, tmp_path):
    from mm_embed_trl.data.collators import EmbeddingCollator

    rotated, upright = _sideways_jpeg(tmp_path / "photo.jpg")
    got = qwen2_vl_model.encode([{"image": str(rotated)}, (str(rotated), "what is it?")])
    assert torch.equal(got, qwen2_vl_model.encode([{"image": str(upright)}, (str(upright), "what is it?")]))
    collator = EmbeddingCollator(qwen2_vl_model.processor, image_root=tmp_path, num_negatives=0)
    rows = [{"qry": "find it", "qry_image_path": name, "pos_text": "a photo", "pos_image_path": name}
            for name in (rotated.name, upright.name)]
    sideways, straight = collator(rows[:1]), collator(rows[1:])
    for side in ("query", "positive"):
        assert torch.equal(sideways[side]["pixel_values"], straight[side]["pixel_values"])
        assert torch.equal(sideways[side]["image_grid_thw"], straight[side]["image_grid_thw"])


def test_a_multi_frame_image_says_once_that_its_first_frame_is_used(tmp_path, caplog, monkeypatch):
    from mm_embed_trl.data import images

    monkeypatch.setattr(images, "_multi_frame_reported", False)  # as in a fresh process
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "other.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.images"):
        first = load_image(str(tmp_path / "clip.gif"), where="row 4, column 'qry_image_path'")
        load_image(str(tmp_path / "other.gif"))
        load_image(str(tmp_path / "clip.gif"))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(frames[0]))
    warnings = [r.getMessage() for r in caplog.records if "frame" in r.getMessage()]
    assert len(warnings) == 1
    assert "row 4, column 'qry_image_path'" in warnings[0] and "clip.gif" in warnings[0] and "3 frames" in warnings[0]
    assert "first frame" in warnings[0] and "video" in warnings[0]
