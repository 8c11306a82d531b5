"""Small videos for tests, made on the spot: flat frames whose colour encodes their index, frame folders named so that
string order is wrong (``frame_10`` before ``frame_2``), and video files written with PyAV."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

__all__ = ["frame", "frame_folder", "video_file"]


def frame(value: int, size=(56, 56)) -> Image.Image:
    """A flat frame whose colour encodes its index, so a test can read which frames were kept."""
    return Image.new("RGB", size, (value, 255 - value, (7 * value) % 256))


def frame_folder(path, count: int, ext: str = "jpg"):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(count):  # names sort wrongly as strings (frame_10 < frame_2): natural order is expected
        frame(i * 10).save(path / f"frame_{i}.{ext}")
    return path


def video_file(path, count: int, fps: int = 4):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(count):
            image = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 8, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    return path
