"""Decoding a video file keeps only the sampled frames: the frames equal those of decoding every frame and picking by
the documented rules (every sampling mode, with and without a frame count in the container, with a wrong one), and
the decoder never holds all the frames at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mm_embed_trl.data.videos import VideoLoadError, VideoSampling, load_video

av = pytest.importorskip("av")

WIDTH, HEIGHT, RATE = 97, 61, 30  # an odd size


def _clip(path, count: int, width: int = WIDTH, height: int = HEIGHT, noise: bool = True):
    """A clip of ``count`` distinct frames (noise over a brightness ramp, so that no two decode alike)."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(count):
            pixels = np.full((height, width, 3), (i * 7) % 256, dtype=np.uint8)
            if noise:
                pixels[: height // 2] = rng.integers(0, 256, (height // 2, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """name -> (path, what the container says of its frame count)."""
    root = tmp_path_factory.mktemp("clips")
    avi = _clip(root / "full.avi", 90)
    truncated = root / "truncated.avi"  # its header still says 90 frames, and fewer decode
    truncated.write_bytes(avi.read_bytes()[: int(avi.stat().st_size * 0.6)])
    with av.open(str(truncated)) as container:
        assert container.streams.video[0].frames == 90 and 10 < len(list(container.decode(video=0))) < 90
    return {
        "mp4": _clip(root / "clip.mp4", 90),  # stream.frames exact
        "mkv": _clip(root / "clip.mkv", 90),  # stream.frames 0: no count in the container
        "truncated-avi": truncated,  # stream.frames wrong
    }


def _every_frame(path):
    """The reference: every frame decoded, as RGB arrays, and the stream's frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)], float(rate)


def _linspace(total: int, count: int) -> list[int]:  # MMEB-V2's rule
    return list(range(total)) if count >= total else np.linspace(0, total - 1, count).astype(int).tolist()


class _OddSampler:
    """A processor whose sample_frames picks out of order, twice the same frame, and the last frame as -1."""

    class video_processor:  # noqa: N801
        @staticmethod
        def sample_frames(metadata, fps=None):
            total = metadata.total_num_frames
            return np.array([total // 2, 3, 3, -1, 0, total - 2])


def _qwen2_vl():
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    class Processor:
        video_processor = Qwen2VLVideoProcessor()

    return Processor()


def _reference_indices(mode: str, total: int, fps: float, processor) -> list[int]:
    if mode == "evenly":  # 8 frames spread evenly
        return _linspace(total, 8)
    if mode == "evenly-more-than-the-video":
        return list(range(total))
    if mode == "fps":  # 2 per second, at most 32: floor(seconds * 2) frames spread evenly
        return _linspace(total, min(max(1, int(total / fps * 2)), 32))
    if mode == "fps-capped":  # 2 per second, at most 4
        return _linspace(total, min(max(1, int(total / fps * 2)), 4))
    from transformers.video_utils import VideoMetadata

    picked = np.asarray(
        processor.video_processor.sample_frames(
            VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps), fps=2.0
        )
    ).tolist()
    limit = 4 if mode == "qwen2-vl-capped" else 32
    return [picked[j] for j in _linspace(len(picked), limit)]


MODES = {
    "evenly": VideoSampling(max_frames=8),
    "evenly-more-than-the-video": VideoSampling(max_frames=500),
    "fps": VideoSampling(fps=2.0, max_frames=32),
    "fps-capped": VideoSampling(fps=2.0, max_frames=4),
    "qwen2-vl": VideoSampling(fps=2.0, max_frames=32),
    "qwen2-vl-capped": VideoSampling(fps=2.0, max_frames=4),
    "odd-sampler": VideoSampling(fps=2.0, max_frames=32),
}


@pytest.mark.parametrize("container", ["mp4", "mkv", "truncated-avi"])
def test_decoded_frames_equal_decoding_every_frame_and_picking(clips, container):
    path = clips[container]
    frames, fps = _every_frame(path)
    assert len(frames) == 90 or container == "truncated-avi"
    for mode, sampling in MODES.items():
        processor = {"qwen2-vl": _qwen2_vl, "qwen2-vl-capped": _qwen2_vl, "odd-sampler": _OddSampler}.get(mode)
        processor = processor() if processor else None
        if mode == "odd-sampler":
            expected = [len(frames) // 2, 3, 3, len(frames) - 1, 0, len(frames) - 2]
        else:
            expected = _reference_indices(mode, len(frames), fps, processor)
        video = load_video(str(path), sampling=sampling, processor=processor)
        assert video.fps == fps and video.source == str(path)
        assert len(video.frames) == len(expected), mode
        for image, index in zip(video.frames, expected, strict=True):
            assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
            np.testing.assert_array_equal(np.asarray(image), frames[index], err_msg=f"{mode}: frame {index}")
        assert len({id(image) for image in video.frames}) == len(video.frames)  # a frame picked twice: two images


class _Tracker:
    """Wraps ``av.open`` so that each decoded frame is counted: before each next frame, how many of the frames decoded
    before it are still referenced outside the tracker (a frame is freed when nothing refers to it)."""

    def __init__(self):
        self.decoded = 0
        self.most_held = 0
        self._open = av.open

    def open(self, *args, **kwargs):
        tracker, container = self, self._open(*args, **kwargs)

        class Container:
            def __getattr__(self, name):
                return getattr(container, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return container.__exit__(*exc)

            def decode(self, *args, **kwargs):
                return tracker.frames(container.decode(*args, **kwargs))

        return Container()

    def frames(self, frames):
        seen = []
        baseline = None
        for frame in frames:
            if baseline is None:  # the references of the list and of getrefcount's argument
                seen.append(object())
                baseline = sys.getrefcount(seen[0])
                seen.pop()
            self.most_held = max(self.most_held, sum(sys.getrefcount(seen[i]) > baseline for i in range(len(seen))))
            seen.append(frame)
            self.decoded += 1
            yield frame
        self.most_held = max(self.most_held, sum(sys.getrefcount(seen[i]) > baseline for i in range(len(seen))))


@pytest.mark.parametrize("container", ["mp4", "mkv", "truncated-avi"])
def test_decoding_holds_only_the_sampled_frames(clips, container, monkeypatch):
    tracker = _Tracker()
    monkeypatch.setattr(av, "open", tracker.open)
    video = load_video(str(clips[container]), sampling=VideoSampling(max_frames=8))
    assert len(video) == 8
    total = len(_every_frame(clips[container])[0])
    assert tracker.decoded >= total  # every frame went through the tracker (twice where the count was a guess)
    assert tracker.most_held <= 2, f"{tracker.most_held} decoded frames held at once, of {total}"

    # The tracker does see frames kept: holding them all, as decoding into a list did, counts them all.
    keeper = _Tracker()
    with keeper.open(str(clips[container])) as opened:
        held = [frame for frame in opened.decode(video=0)]
    assert len(held) == total and keeper.most_held >= total - 1


def test_peak_memory_grows_by_the_sampled_frames_not_the_video(tmp_path):
    """300 frames of 640x480 are 132 MB decoded (yuv420p); the 8 kept frames as RGB images about 7 MB. Measured in a
    fresh process, as the growth of its resident-memory peak (VmHWM, reset to the current size just before)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    path = _clip(tmp_path / "long.mp4", 300, width=640, height=480, noise=False)
    all_frames_mb = 300 * 640 * 480 * 1.5 / 2**20
    script = textwrap.dedent(
        f"""
        import av, numpy, PIL.Image
        from mm_embed_trl.data.videos import VideoSampling, load_video

        def status(key):
            with open("/proc/self/status") as lines:
                return next(int(line.split()[1]) for line in lines if line.startswith(key + ":")) / 1024

        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak (VmHWM) becomes the current resident size
        before = status("VmRSS")
        video = load_video({str(path)!r}, sampling=VideoSampling(max_frames=8))
        assert len(video) == 8
        print(status("VmHWM") - before)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if result.returncode != 0 and "clear_refs" in result.stderr:
        pytest.skip(f"cannot reset the peak here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    growth_mb = float(result.stdout.split()[-1])
    assert growth_mb < all_frames_mb / 3, f"peak memory grew {growth_mb:.0f} MB; all frames are {all_frames_mb:.0f} MB"


def test_a_video_without_frames_says_so(tmp_path):
    path = tmp_path / "empty.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoLoadError, match=r"row 1: the video file '.*empty.avi' holds no frame"):
        load_video(str(path), where="row 1")
