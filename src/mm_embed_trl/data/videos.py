"""Load one video from whatever a dataset row holds, sampled as the backbone's processor is set to sample it.

A video value is one of:

* ``None`` / ``""`` -> no video;
* a folder of frame images (MMEB-V2's ``frames/<video_id>/``), read in natural order (``frame_2`` before
  ``frame_10``);
* a list of frames: paths, ``PIL.Image``s, ``datasets.Image`` values or encoded bytes (anything
  :func:`~mm_embed_trl.data.images.load_image` reads);
* a video file (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ``.webm``, ...), decoded with PyAV (``pip install
  'mm-embed-trl[video]'``), only the sampled frames converted to images.

Frame sampling lives in the processor (:func:`set_video_options`), so it is saved with the model and applies alike to
training, ``encode``, evaluation and the sentence-transformers export: ``fps`` frames per second of a video file
(Qwen-VL's own rule, ``video_processor.sample_frames``), at most ``max_frames`` frames, spread evenly. Frame folders
and lists carry no frame rate: ``max_frames`` of them are taken evenly, as MMEB-V2's evaluation does
(``np.linspace(0, n - 1, max_frames).astype(int)``).

Bad input raises :class:`VideoLoadError` naming the row and column (``where``): a missing file or folder, a folder
with no frame image, a file no decoder reads, a video with no frame.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageLoadError, load_image, missing_file_fix, path_candidates
from .schema import is_missing

__all__ = [
    "FRAME_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "Video",
    "VideoLoadError",
    "VideoSampling",
    "find_video",
    "holds_frames",
    "load_video",
    "set_video_options",
    "video_sampling",
]

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
# Frames kept when nothing else is set: MMEB-V2 evaluates with 8 frames per video.
DEFAULT_MAX_FRAMES = 8


class VideoLoadError(ImageLoadError):
    """A video value could not be turned into frames. The message names the row/column and the fix."""


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video are kept: ``fps`` per second of a video file (None: evenly), at most ``max_frames``,
    (the processor pads a video to its temporal patch, two frames for Qwen-VL, by repeating the last one)."""

    fps: float | None = None
    max_frames: int = DEFAULT_MAX_FRAMES


@dataclass
class Video:
    """The sampled frames of one video (8-bit RGB ``PIL.Image``s), the source's frame rate when known, and where it
    came from (for messages and identity)."""

    frames: list = field(default_factory=list)
    fps: float | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.frames)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def evenly_spaced(total: int, count: int) -> np.ndarray:
    """``count`` frame indices out of ``total``, spread evenly, first and last included (MMEB-V2's rule)."""
    if count >= total:
        return np.arange(total)
    return np.linspace(0, total - 1, count).astype(int)


def video_sampling(processor) -> VideoSampling:
    """The sampling options saved with ``processor`` (its video processor's ``fps`` / ``max_frames`` as
    :func:`set_video_options` sets them; the MMEB-V2 default of 8 evenly spaced frames otherwise)."""
    video_processor = getattr(processor, "video_processor", None)
    fps = getattr(video_processor, "fps", None) if getattr(video_processor, "do_sample_frames", False) else None
    max_frames = getattr(video_processor, "mm_embed_max_frames", None) or DEFAULT_MAX_FRAMES
    return VideoSampling(fps=fps, max_frames=int(max_frames))


def set_video_options(
    processor, *, fps: float | None = None, max_frames: int | None = None, max_pixels: int | None = None
) -> None:
    """Set how videos are sampled and how many tokens a frame may take, in ``processor`` (so they are saved with it).

    Args:
        fps: frames sampled per second of a video file (Qwen-VL's rule, also what ``transformers`` applies when the
            sentence-transformers export is handed a video file); None samples ``max_frames`` evenly.
        max_frames: the most frames kept of one video (frame folders and lists: exactly this many, evenly spaced,
            when they have more).
        max_pixels: the pixel budget of one frame (Qwen-VL's ``video_processor.size["longest_edge"]``): frames are
            downscaled into it, which bounds a video's tokens at ``max_frames / 2 * max_pixels / 784``.
    """
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is None:
        raise ValueError(
            f"{type(processor).__name__} has no video processor, so this backbone takes no video: video options apply "
            "to video-language processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision)."
        )
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"video fps must be a positive number of frames per second, got {fps}.")
        video_processor.fps = float(fps)
        video_processor.do_sample_frames = True
        video_processor.num_frames = None
    if max_frames is not None:
        if max_frames < 1:
            raise ValueError(f"video max_frames must be >= 1, got {max_frames}.")
        video_processor.mm_embed_max_frames = int(max_frames)
        if hasattr(video_processor, "max_frames"):  # transformers' own cap, used when it samples a file itself
            video_processor.max_frames = int(max_frames)
    if max_pixels is not None:
        size = getattr(video_processor, "size", None)
        if size is None or "longest_edge" not in size:
            raise ValueError(
                f"video_max_pixels applies to dynamic-resolution video processors (Qwen-VL); "
                f"{type(video_processor).__name__} has a fixed input resolution."
            )
        shortest = size.get("shortest_edge")
        if shortest is not None and max_pixels < shortest:
            raise ValueError(f"video_max_pixels={max_pixels} is below the processor's minimum of {shortest} pixels.")
        video_processor.size = {"longest_edge": int(max_pixels), "shortest_edge": shortest}


def _file_indices(total: int, fps: float | None, sampling: VideoSampling, processor) -> np.ndarray:
    """Frame indices of a video file: the processor's own ``sample_frames`` when it samples by fps (so the export,
    which lets transformers sample, picks the same frames), else ``max_frames`` evenly."""
    video_processor = getattr(processor, "video_processor", None) if processor is not None else None
    if sampling.fps is not None and fps and hasattr(video_processor, "sample_frames"):
        from transformers.video_utils import VideoMetadata

        metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
        try:
            indices = np.asarray(video_processor.sample_frames(metadata, fps=sampling.fps))
        except ValueError:  # too short for the processor's minimum: every frame
            indices = np.arange(total)
        return indices[evenly_spaced(len(indices), sampling.max_frames)]
    if sampling.fps is not None and fps:
        count = max(1, math.floor(total / fps * sampling.fps))
        return evenly_spaced(total, min(count, sampling.max_frames))
    return evenly_spaced(total, sampling.max_frames)


def _positions(indices: np.ndarray, total: int) -> list[int]:
    """``indices`` as plain positions into ``total`` frames, as ``frames[i]`` of a list of them reads each (a negative
    one from the end, one out of range an IndexError)."""
    positions = []
    for i in indices:
        i = int(i)
        if not -total <= i < total:
            raise IndexError("list index out of range")
        positions.append(i % total)
    return positions


def _decode_picked(path: Path, wanted: set[int]) -> tuple[int, dict]:
    """Decode every frame of ``path``'s first video stream once, in order, keeping only those at ``wanted`` positions
    (as RGB images): the number of frames decoded, and the kept frames by position. Besides the kept frames, only the
    decoder's own working frames are alive at once."""
    import av
    from PIL import Image

    kept = {}
    total = 0
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            if total in wanted:
                kept[total] = Image.fromarray(frame.to_ndarray(format="rgb24"))
            total += 1
    return total, kept


def _decode_file(path: Path, sampling: VideoSampling, processor, where: str) -> Video:
    try:
        import av
    except ImportError as err:
        raise VideoLoadError(
            f"{where}: '{path}' is a video file, and decoding one needs PyAV: pip install 'mm-embed-trl[video]' "
            "(or pip install av). A folder of frame images needs nothing more."
        ) from err

    try:
        # The sampled frames depend on the number of frames, and only decoding every frame counts them exactly
        # (stream.frames is 0 for some containers, or off). Frames are never all held at once: one decoding pass keeps
        # only the frames that the container's count (without one: the number of video packets, read without decoding)
        # picks, and counts the frames; if that guess was off, a second pass keeps the frames the exact count picks.
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            guess = stream.frames or 0
            if guess <= 0:
                guess = sum(1 for packet in container.demux(stream) if packet.size)
        positions = None
        if guess > 0:
            try:
                positions = _positions(_file_indices(guess, fps, sampling, processor), guess)
            except Exception:  # decided by the exact count below
                positions = None
        total, kept = _decode_picked(path, set(positions or ()))
        if positions is None or total != guess:
            positions = _positions(_file_indices(total, fps, sampling, processor), total)
            kept = _decode_picked(path, set(positions))[1] if positions else {}
        images, seen = [], set()
        for i in positions:  # a frame picked twice is two images
            images.append(kept[i].copy() if i in seen else kept[i])
            seen.add(i)
    except VideoLoadError:
        raise
    except Exception as err:  # PyAV raises InvalidDataError, IndexError (no video stream), ...
        raise VideoLoadError(
            f"{where}: could not decode the video file '{path}' ({type(err).__name__}: {err}). Check that it is a "
            "complete video (mp4, webm, ...) with a video stream, or extract its frames to a folder."
        ) from err
    if not images:
        raise VideoLoadError(f"{where}: the video file '{path}' holds no frame. Replace it, or drop the row.")
    return Video(images, fps, str(path))


EMPTY_FRAME_FOLDER_FIX = (
    "Extract the video's frames into it, point the rows at the video file instead, or drop the rows that name it."
)
UNREADABLE_FRAME_FOLDER_FIX = (
    "Let the user who runs training list and enter it (its permissions), or drop the rows that name it."
)


def _frames_in(folder: str | os.PathLike, first_only: bool = False) -> list[str]:
    """The frame images' names in a frame folder: files (a link to one too) named with a frame extension; a subfolder,
    or a link named like one whose target is gone or out of reach, is not a frame. Raises ``OSError`` for a folder that
    cannot be read: not listed, or listed but not entered (its first frame cannot be looked at)."""
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.lower().endswith(FRAME_EXTENSIONS):
                continue
            try:
                is_file = entry.is_file()
            except OSError:  # a link into a folder that cannot be entered
                is_file = False
            if is_file:
                names.append(entry.name)
                if first_only:
                    break
    if names:  # the listing's file types need no permission to enter the folder; opening a frame does
        os.stat(os.path.join(folder, names[0]))
    return names


def holds_frames(folder: str | os.PathLike) -> bool:
    """Does a frame folder hold a frame image (as the loader reads it)? Raises ``OSError`` when it cannot be read."""
    return bool(_frames_in(folder, first_only=True))


def _frame_folder(path: Path, where: str) -> list[Path]:
    try:
        names = sorted(_frames_in(path), key=_natural_key)
    except OSError as err:
        raise VideoLoadError(
            f"{where}: the frame folder '{path}' cannot be read ({err}). {UNREADABLE_FRAME_FOLDER_FIX}"
        ) from err
    if not names:
        raise VideoLoadError(
            f"{where}: the frame folder '{path}' holds no frame image ({', '.join(FRAME_EXTENSIONS)}). "
            + EMPTY_FRAME_FOLDER_FIX
        )
    return [path / n for n in names]


def find_video(path: str | os.PathLike, image_root=None) -> str | None:
    """The frame folder or video file ``path`` names: the first of
    :func:`~mm_embed_trl.data.images.path_candidates` (``image_root``, then the working directory) that is a folder or
    a file; None when none is. Plain strings: the pre-training check asks this of every video path of a dataset."""
    return next((c for c in path_candidates(path, image_root) if os.path.isdir(c) or os.path.isfile(c)), None)


def _resolve(value: str | os.PathLike, image_root, where: str) -> Path:
    text = os.fspath(value)
    if text.startswith(("http://", "https://")):
        raise VideoLoadError(f"{where}: video value {text!r} is a URL; download videos first and pass local paths.")
    found = find_video(text, image_root)
    if found is None:
        tried = ", ".join(f"'{t}'" for t in path_candidates(text, image_root))
        fix = missing_file_fix(text, image_root, "video file or frame folder")
        raise VideoLoadError(f"{where}: video not found: {text!r} (tried {tried}). {fix}")
    return Path(found)


def load_video(
    value: Any,
    image_root: str | os.PathLike | None = None,
    *,
    where: str = "video",
    sampling: VideoSampling | None = None,
    processor=None,
) -> Video | None:
    """Turn a video value (see the module docstring) into its sampled frames, or None for "no video".

    ``sampling`` defaults to the options saved with ``processor`` (:func:`video_sampling`).
    """
    if isinstance(value, Video):
        return value
    if is_missing(value) or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    sampling = sampling or video_sampling(processor)
    if isinstance(value, Mapping) and set(value) <= {"path", "bytes"} and value.get("path"):
        value = value["path"]  # a datasets.Video-like value: its file
    if isinstance(value, (str, os.PathLike)):
        path = _resolve(value, image_root, where)
        if path.is_dir():
            frames, fps, source = _frame_folder(path, where), None, str(path)
        elif path.suffix.lower() in FRAME_EXTENSIONS:
            frames, fps, source = [path], None, str(path)  # a one-frame video
        else:
            return _uniform_size(_decode_file(path, sampling, processor, where))
    elif isinstance(value, (list, tuple, np.ndarray)):
        frames, fps, source = list(value), None, f"a list of {len(value)} frames"
    else:
        raise TypeError(
            f"{where}: unsupported video value of type {type(value).__name__}; pass a video file path, a folder of "
            "frame images, a list of frames (paths or PIL images), or ''/None for no video."
        )
    picked = evenly_spaced(len(frames), sampling.max_frames)
    images = [load_image(frames[i], image_root, where=f"{where}, frame {int(i)}") for i in picked]
    if any(image is None for image in images):
        raise VideoLoadError(f"{where}: a frame of {source} is empty ('' or None); every frame needs an image.")
    return _uniform_size(Video(images, fps, source))


def _uniform_size(video: Video) -> Video:
    """Frames of one video share one patch grid: a stray frame of another size is resized to the first frame's."""
    size = video.frames[0].size
    video.frames = [f if f.size == size else f.resize(size) for f in video.frames]
    return video


def video_identity(value: Any) -> str:
    """A cheap, stable identity of a video value (paths by path, frame lists by their frames' identities)."""
    from .images import image_identity

    if isinstance(value, Video):
        return f"video:{value.source}:{len(value.frames)}"
    if isinstance(value, (list, tuple)):
        return "frames:" + "|".join(image_identity(v) for v in value)
    if isinstance(value, Mapping) and value.get("path"):
        return f"video-path:{value['path']}"
    return "video-" + image_identity(value) if not is_missing(value) else ""
