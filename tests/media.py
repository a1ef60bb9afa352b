"""Test videos made with PyAV from the fixture photos (no downloads): pans and zooms over real images."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

PHOTOS = sorted((Path(__file__).parent / "fixtures" / "photos").glob("*.jpg"))
FPS, SECONDS, SIZE = 10, 7, (320, 240)  # source videos: longer than a clip, at another rate and size


def pan_frames(photo: Path, count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``count`` frames that pan and zoom across a photo: ``(H, W, 3)`` uint8 each."""
    image = Image.open(photo).convert("RGB")
    width, height = size
    frames = []
    for index in range(count):
        t = index / max(1, count - 1)
        crop_w = int(image.width * (0.7 - 0.3 * t))
        crop_h = min(image.height, int(crop_w * height / width))
        left, top = int((image.width - crop_w) * t), int((image.height - crop_h) * (0.5 - 0.3 * t))
        crop = image.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.Resampling.BILINEAR)
        frames.append(np.asarray(crop))
    return frames


def write_video(path: Path, frames: list[np.ndarray] | None, audio_seconds: float = 0, faststart: bool = False) -> Path:
    """An MP4/M4A with an H.264 track of ``frames`` at FPS, optionally a mono AAC tone and the index (moov) first."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        video = container.add_stream("libx264", rate=FPS) if frames else None
        if video is not None:
            video.width, video.height, video.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
            video.options = {"preset": "ultrafast", "threads": "1"}
        audio = container.add_stream("aac", rate=16000) if audio_seconds else None
        for rgb in frames or []:
            container.mux(video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        if video is not None:
            container.mux(video.encode(None))
        for index in range(int(audio_seconds * 16000) // 1024):
            t = (np.arange(1024) + index * 1024) / 16000
            frame = av.AudioFrame.from_ndarray(
                (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, index * 1024
            container.mux(audio.encode(frame))
        if audio is not None:
            container.mux(audio.encode(None))
    return path
