"""Load one image from whatever a dataset row holds, with an error that says which row and how to fix it.

An image value (see ``docs/DESIGN.md``) is one of:

* ``None`` or ``""`` (MMEB's "no image") -> ``None``;
* a path: absolute, relative to ``image_root``, or (as a fallback) relative to the working directory;
* a ``PIL.Image.Image`` (also what a decoded ``datasets.Image`` column yields);
* an undecoded ``datasets.Image`` value ``{"bytes": b"..." | None, "path": "..." | None}``;
* raw encoded bytes (``bytes`` / ``bytearray`` / ``memoryview``);
* a ``numpy`` array ``(H, W)`` / ``(H, W, C)`` of pixels.

Every image comes out as 8-bit RGB (``convert_rgb=True``, the default): 16-bit and float images are scaled to
8 bits (not clipped), transparent pixels (RGBA, LA, palette transparency) are composited over white.

Every image comes out upright: the EXIF orientation tag of a photo stored sideways is applied (as ``datasets``,
transformers' ``load_image`` and so the sentence-transformers export do). A multi-frame image (animated GIF,
multi-page TIFF) gives its first frame, with a warning the first time (pass a video as a video: see
:mod:`mm_embed_trl.data.videos`).

Every image is fully decoded here (``Image.load()``), so a corrupt or truncated file fails with a clear
:class:`ImageLoadError` at load time rather than deep inside a processor call, and no file handle stays
open (important with many dataloader workers).
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .schema import is_missing

logger = logging.getLogger(__name__)

__all__ = [
    "ImageLoadError",
    "find_file",
    "has_image",
    "image_size",
    "load_image",
    "load_images",
    "max_image_tokens",
    "missing_file_fix",
    "path_candidates",
    "resolve_image_path",
]


class ImageLoadError(ValueError):
    """An image value could not be turned into a ``PIL.Image``. The message names the row/column and the fix."""


def path_candidates(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[str]:
    """Where a file path of the data is looked for, in order: ``path`` itself when absolute; otherwise
    ``image_root / path`` (when an ``image_root`` is given) and then ``path`` relative to the working directory.
    Plain strings: the pre-training check asks this of every path of a dataset."""
    p = os.path.expanduser(os.fspath(path))
    if len(p) > 1:
        p = p.rstrip("/" + os.sep) or p  # "a.png/" is a.png, as pathlib reads it
    if os.path.isabs(p):
        return [p]
    tried = []
    if image_root is not None and os.fspath(image_root) != "":
        tried.append(os.path.join(os.path.expanduser(os.fspath(image_root)), p))
    tried.append(os.path.join(os.getcwd(), p))
    return tried


def find_file(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> str | None:
    """The first of :func:`path_candidates` that is a file, or None: where the loader reads an image file from. Plain
    strings, as the pre-training check asks this of every path of a dataset."""
    return next((c for c in path_candidates(path, image_root) if os.path.isfile(c)), None)


def resolve_image_path(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """Return ``(resolved, tried)``: the file :func:`find_file` finds and every candidate tried. When there is none,
    ``resolved`` is the first candidate (the one an error message should name)."""
    tried = path_candidates(path, image_root)
    return Path(find_file(path, image_root) or tried[0]), [Path(candidate) for candidate in tried]


def missing_file_fix(path: str | os.PathLike, image_root: str | os.PathLike | None, thing: str = "image file") -> str:
    """What to do about a ``thing`` that ``path`` names and that is not there: one wording for the loaders' errors and
    the pre-training check (:mod:`mm_embed_trl.data.validation`)."""
    if os.path.isabs(os.path.expanduser(os.fspath(path))):
        return f"An absolute path: the {thing} is not there. Put it there, or drop the rows that name it."
    if image_root is None or os.fspath(image_root) == "":
        return (
            f"No image_root was given, so relative paths are looked for in the working directory ('{os.getcwd()}'): "
            f"pass --image_root (image_root=...) naming the folder the dataset's paths are relative to, or put the "
            f"{thing} there."
        )
    return (
        f"Check that image_root ('{image_root}', --image_root) is the folder the dataset's paths are relative to, "
        f"and that the {thing} exists."
    )


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = (255, 255, 255, 255)


def _high_depth_to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit greyscale ("I;16*", "I", "F") scaled to 8 bits instead of clipped (PIL's own conversion
    clips at 255: a 16-bit photo comes out almost white).

    "I;16*" spans 0..65535. "I" and "F" carry no range of their own: values within 0..255 are kept as 8-bit data,
    "F" values within 0..1 are scaled by 255, anything else is read as 16-bit data (clipped to 0..65535), which is
    how 16-bit PNG/TIFF files decode.
    """
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=65535.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode in _SIXTEEN_BIT_MODES or not (low >= 0 and high <= 255):
        scale = 255.0 / 65535.0
    elif image.mode == "F" and high <= 1.0:
        scale = 255.0
    else:
        scale = 1.0
    values = np.clip(values * scale, 0, 255)
    return Image.fromarray(np.rint(values).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: high bit depths scaled, transparency composited over white (what
    `transformers`' `convert_to_rgb` does, so images embed alike here and in the sentence-transformers export)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_depth_to_8_bit(image)
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    if image.mode == "La":  # premultiplied: PIL converts it to LA only
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


_ORIENTATION = 0x0112  # the EXIF orientation tag
_SIDEWAYS = frozenset({5, 6, 7, 8})  # orientations that swap width and height
_multi_frame_reported = False


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(_ORIENTATION) or 1


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of ``image`` once its EXIF orientation is applied, from its header alone."""
    width, height = image.size
    return (width, height) if _orientation(image) in _SIDEWAYS else (height, width)


def _report_multi_frame(image: Image.Image, where: str, name: str) -> None:
    global _multi_frame_reported
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and not _multi_frame_reported:
        _multi_frame_reported = True
        logger.warning(
            "%s: %s has %d frames (an animated or multi-page image); only its first frame is used, for this and every "
            "later multi-frame image (not logged again); to embed it as a video, pass it as the input's video.",
            where, name, frames,
        )


def _finish(image: Image.Image, convert_rgb: bool, *, where: str = "image", name: str = "the image") -> Image.Image:
    """Decode pixels now, turn them upright (EXIF orientation) and, when asked, convert to 8-bit RGB
    (see :func:`_to_rgb`)."""
    _report_multi_frame(image, where, name)
    image.load()
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if convert_rgb and image.mode != "RGB":
        image = _to_rgb(image)
    return image


def _decode_failure_hint(err: Exception, corrupt_hint: str) -> str:
    """What to do about a failed decode: PIL's pixel limit is not a corrupt file."""
    if isinstance(err, Image.DecompressionBombError):
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f" ({found.group(1)} pixels)" if found else ""
        return (
            f"The file is not corrupt: the image{size} exceeds PIL's decompression-bomb limit, twice "
            f"PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}). If the image is trusted, raise the limit "
            "before loading data (`PIL.Image.MAX_IMAGE_PIXELS = None`, or a larger int), or downscale the image."
        )
    return corrupt_hint


def _open_encoded(source: Path | bytes, where: str, origin: str, read):
    """``read(image)`` of the image file or encoded bytes ``source`` (opened lazily: only what ``read`` needs is
    decoded), with PIL's failures reported as an :class:`ImageLoadError` naming ``where`` and ``origin``."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            # Inside the ``with`` so the result owns its pixels after the file object is closed.
            return read(img)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad data
        if isinstance(source, Path):
            hint = "Check that the file is a valid image (PNG, JPEG, ...) and not truncated or corrupt."
            problem = f"could not read the image file '{source}'"
        else:
            hint = "Check that it is a valid image file (PNG, JPEG, ...) and not truncated or corrupt."
            problem = f"could not decode the image {origin}"
        raise ImageLoadError(
            f"{where}: {problem} ({type(err).__name__}: {err}). {_decode_failure_hint(err, hint)}"
        ) from err


def _decode(source: Path | bytes, *, convert_rgb: bool, where: str, origin: str) -> Image.Image:
    name = f"'{source}'" if isinstance(source, Path) else f"the image {origin}"

    def read(img):
        out = _finish(img, convert_rgb, where=where, name=name)
        return out if out is not img else img.copy()  # an independent copy: ``img`` closes with its file

    return _open_encoded(source, where, origin, read)


def _encoded_source(value: Any, image_root: str | os.PathLike | None, *, where: str) -> tuple[Path | bytes, str] | None:
    """Where the encoded image of ``value`` is: ``(resolved file path or bytes, how it was given)``, or None for "no
    image". Missing files, URLs and unsupported values raise here, before anything is opened."""
    if is_missing(value):
        return None
    if isinstance(value, (str, os.PathLike)):
        return _resolve_file(value, image_root, where=where), "from a file"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (bytes(value), "given as bytes") if len(value) else None
    if isinstance(value, dict):
        unknown = set(value) - {"bytes", "path"}
        if unknown:
            raise TypeError(
                f"{where}: an image dict must look like a datasets.Image value {{'bytes': ..., 'path': ...}}; "
                f"got unknown keys {sorted(unknown)}."
            )
        data, path = value.get("bytes"), value.get("path")
        if data is not None and len(data) > 0:
            # datasets keeps ``path`` for information only when bytes are present (e.g. the original name).
            return bytes(data), f"stored as bytes (original path {path!r})" if path else "stored as bytes"
        if is_missing(path):
            return None  # {"bytes": None, "path": None} is datasets' spelling of "no image"
        return _resolve_file(path, image_root, where=where), "from a file"
    raise TypeError(
        f"{where}: unsupported image value of type {type(value).__name__}; pass a file path, a PIL.Image, "
        "a datasets.Image dict {'bytes': ..., 'path': ...}, encoded bytes, or ''/None for no image."
    )


def _resolve_file(value: str | os.PathLike, image_root: str | os.PathLike | None, *, where: str) -> Path:
    text = os.fspath(value)
    if text.startswith(("http://", "https://")):
        raise ImageLoadError(
            f"{where}: image value {text!r} is a URL; mm-embed-trl does not download images. "
            "Download the images first and pass local paths (relative to --image_root)."
        )
    found = find_file(text, image_root)  # the check's look-up (os.path: a name too long is not there, not an OSError)
    if found is None:
        tried = ", ".join(f"'{t}'" for t in path_candidates(text, image_root))
        fix = missing_file_fix(text, image_root)
        raise ImageLoadError(f"{where}: image file not found: {text!r} (tried {tried}). {fix}")
    return Path(found)


def load_image(
    value: Any,
    image_root: str | os.PathLike | None = None,
    *,
    where: str = "image",
    convert_rgb: bool = True,
) -> Image.Image | None:
    """Turn an image value from a dataset row or a user into a fully loaded ``PIL.Image`` (or ``None``).

    Args:
        value: ``None``/``""`` (no image), a path, a ``PIL.Image``, a ``datasets.Image`` dict
            ``{"bytes", "path"}``, raw encoded bytes, or a numpy pixel array.
        image_root: Folder that relative paths are relative to (MMEB stores paths relative to its image
            folder). Relative paths are also tried against the working directory.
        where: Names the value in error messages, e.g. ``"row 12, column 'qry_image_path'"``.
        convert_rgb: Convert to 3-channel RGB (what every vision processor expects).

    Returns:
        The image with pixels loaded (no open file handle), or ``None`` when ``value`` means "no image".

    Raises:
        ImageLoadError: the file is missing or not a readable image; the message names ``where``, the
            path(s) tried and ``image_root``.
        TypeError: ``value`` has an unsupported type.
    """
    if isinstance(value, Image.Image):
        try:
            return _finish(value, convert_rgb, where=where, name="the PIL image")
        except Exception as err:
            raise ImageLoadError(
                f"{where}: the PIL image could not be decoded ({type(err).__name__}: {err}). "
                "Check that the underlying file is a valid, complete image."
            ) from err
    if _is_array(value):
        try:
            return _finish(Image.fromarray(value), convert_rgb)
        except Exception as err:
            raise ImageLoadError(
                f"{where}: cannot make an image from a numpy array of shape {value.shape} and dtype {value.dtype} "
                f"({err}); pass uint8 pixels shaped (H, W) or (H, W, 3|4)."
            ) from err
    found = _encoded_source(value, image_root, where=where)
    if found is None:
        return None
    source, origin = found
    return _decode(source, convert_rgb=convert_rgb, where=where, origin=origin)


def _is_array(value: Any) -> bool:
    try:  # numpy is a hard dependency of datasets/torch; imported lazily to keep this module light
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, np.ndarray)


def has_image(value: Any) -> bool:
    """Whether an image value holds an image (what :func:`load_image` returns None for does not), without reading
    anything."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        return (data is not None and len(data) > 0) or not is_missing(path)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value) > 0
    return not is_missing(value) if not _is_array(value) else True


def image_size(
    value: Any, image_root: str | os.PathLike | None = None, *, where: str = "image"
) -> tuple[int, int] | None:
    """``(height, width)`` of the image :func:`load_image` makes of ``value`` (upright), read from the file's header
    without decoding its pixels; None when ``value`` means "no image". Raises as :func:`load_image` does."""
    if isinstance(value, Image.Image):
        return _upright_size(value)
    if _is_array(value):
        return tuple(value.shape[:2])
    found = _encoded_source(value, image_root, where=where)
    if found is None:
        return None
    source, origin = found
    return _open_encoded(source, where, origin, _upright_size)


def load_images(
    values: Iterable[Any],
    image_root: str | os.PathLike | None = None,
    *,
    where_prefix: str = "image",
    convert_rgb: bool = True,
) -> list[Image.Image | None]:
    """:func:`load_image` over a list; item ``i`` is reported as ``f"{where_prefix} #{i}"`` in errors."""
    return [
        load_image(v, image_root, where=f"{where_prefix} #{i}", convert_rgb=convert_rgb) for i, v in enumerate(values)
    ]


def set_image_pixel_budget(processor, max_pixels: int | None = None, *, min_pixels: int | None = None) -> None:
    """Bound the pixels per image of a Qwen-VL-style processor (dynamic resolution): larger images are downscaled to
    at most ``max_pixels`` before patching, e.g. ``336 * 336`` for UniME's setting, smaller ones upscaled to at least
    ``min_pixels``; ``None`` keeps that bound as it is.

    The setting lives in the processor, so it is saved with the model and applies alike to training, ``encode``
    and the sentence-transformers export. Processors with a fixed input resolution (LLaVA-OneVision's anyres
    tiles, SigLIP) have no such budget: a clear error says so.
    """
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    has_budget = size is not None and "longest_edge" in size and hasattr(image_processor, "merge_size")
    if not has_budget:
        raise ValueError(
            f"image_max_pixels applies to dynamic-resolution processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); "
            f"{type(image_processor).__name__ if image_processor is not None else type(processor).__name__} "
            "has a fixed input resolution. Leave image_max_pixels unset for this backbone."
        )
    if min_pixels is None:
        min_pixels = size["shortest_edge"] if "shortest_edge" in size else None
    if max_pixels is None:
        max_pixels = size["longest_edge"]
    if min_pixels is not None and max_pixels < min_pixels:
        raise ValueError(f"image_max_pixels={max_pixels} is below the processor's minimum of {min_pixels} pixels.")
    image_processor.size = {"longest_edge": int(max_pixels), "shortest_edge": min_pixels}


def max_image_tokens(processor) -> int | None:
    """The most placeholder tokens one image can become in a dynamic-resolution (Qwen-VL) processor: its pixel budget
    over the pixels of one token (images beyond the budget are downscaled into it); None for other processors."""
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    if size is None or "longest_edge" not in size or not hasattr(image_processor, "merge_size"):
        return None
    pixels_per_token = (image_processor.patch_size * image_processor.merge_size) ** 2
    return int(size["longest_edge"]) // pixels_per_token


def image_identity(value: Any) -> str:
    """A cheap, stable identity of an image value, for de-duplicating inputs and masking identical targets.

    Paths (and ``datasets.Image`` dicts of a path alone) are identified by the path, without reading pixels; raw
    bytes, ``datasets.Image`` dicts holding bytes and PIL images by a hash of their content (a dict's path is then only
    a name: datasets keeps the file's base name when it embeds images, so two images may share ``"image.jpg"``);
    missing values by ``""``; a list (the images of one input) by its images' identities in order.
    """
    import hashlib

    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    if isinstance(value, (list, tuple)):  # the images of one input, in order
        return "images:" + "|".join(image_identity(v) for v in value)
    if isinstance(value, (str, os.PathLike)):
        return f"path:{os.fspath(value)}"
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return "bytes:" + hashlib.sha1(bytes(value["bytes"])).hexdigest()
        if value.get("path"):
            return f"path:{value['path']}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes:" + hashlib.sha1(bytes(value)).hexdigest()
    if isinstance(value, Image.Image):
        return f"pil:{value.mode}:{value.size}:" + hashlib.sha1(value.tobytes()).hexdigest()
    return f"object:{id(value)}"


def load_image_values(value: Any, image_root: Any = None, *, where: str = "image") -> Any:
    """One image value, or a list of them (several images of one input), loaded: a ``PIL.Image``, a list of them, or
    None. Each image of a list is named ``f"{where}[i]"`` in errors."""
    if isinstance(value, (list, tuple)):
        images = [load_image(v, image_root, where=f"{where}[{i}]") for i, v in enumerate(value) if not is_missing(v)]
        if not images:
            return None
        return images if len(images) > 1 else images[0]
    return load_image(value, image_root, where=where)

