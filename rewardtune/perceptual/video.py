"""Demo videos in and out: mp4/webm/mkv/avi/mov (PyAV), gif (PIL) and folders of frame images.

Every reader returns uint8 ``[T,H,W,3]`` RGB frames or raises a one-line :class:`UserError` (missing, unreadable,
empty, frame size changing inside the video). Writers are atomic: a video path only ever holds a complete file.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from rewardtune.errors import UserError
from rewardtune.outputs import folder_mode
from rewardtune.utils.images import IMAGE_SUFFIXES
from rewardtune.utils.io import atomic_path

AV_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
VIDEO_SUFFIXES = AV_SUFFIXES + (".gif",)
FRAME_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".gif")


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` in natural order (``2.png`` before ``10.png``)."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES),
                  key=_natural_key)


def _check_sizes(frames: list[np.ndarray], path: Path) -> np.ndarray:
    if not frames:
        raise UserError(f"video {str(path)!r} has no frames")
    first = frames[0].shape
    for index, frame in enumerate(frames):
        if frame.shape != first:
            raise UserError(f"video {str(path)!r} changes frame size at frame {index}: {first[1]}x{first[0]} -> "
                            f"{frame.shape[1]}x{frame.shape[0]}; all frames of a video must have one size")
    return np.stack(frames)


def _read_folder(path: Path) -> list[np.ndarray]:
    frames = []
    for file in frame_files(path):
        try:
            with Image.open(file) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except (OSError, ValueError, SyntaxError):
            raise UserError(f"frame {str(file)!r} of video folder {str(path)!r} is not a readable image") from None
    return frames


def _read_gif(path: Path) -> list[np.ndarray]:
    try:
        with Image.open(path) as im:
            return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(im)]
    except (OSError, ValueError, SyntaxError, EOFError):
        raise UserError(f"video {str(path)!r} is not a readable GIF") from None


def _read_av(path: Path) -> list[np.ndarray]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{str(path)!r} has no video stream")
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except UserError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"video {str(path)!r} is not readable: {reason}") from None


def read_video(path: str | Path) -> np.ndarray:
    """uint8 ``[T,H,W,3]`` frames of a video file or a folder of frame images.

    Raises:
        UserError: missing path, unsupported suffix, unreadable or empty video, frame size change.
    """
    path = Path(path)
    if path.is_dir():
        frames = _read_folder(path)
    elif not path.is_file():
        raise UserError(f"video {str(path)!r} does not exist")
    elif path.suffix.lower() == ".gif":
        frames = _read_gif(path)
    elif path.suffix.lower() in AV_SUFFIXES:
        frames = _read_av(path)
    else:
        raise UserError(f"video {str(path)!r} has an unsupported type; use {', '.join(VIDEO_SUFFIXES)} or a "
                        "folder of frame images")
    return _check_sizes(frames, path)


def find_videos(spec: str | Path) -> list[Path]:
    """The demo videos named by ``spec``: a folder (its video files and frame-image subfolders, sorted) or a glob.

    A folder that holds only frame images is one video. Raises :class:`UserError` when nothing matches.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        found = [p for p in path.iterdir() if (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
                 or (p.is_dir() and frame_files(p))]
        if not found and frame_files(path):
            found = [path]
    elif glob.has_magic(text):
        found = [Path(p) for p in glob.glob(os.path.expanduser(text))]
        found = [p for p in found if p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES]
    elif path.is_file():
        found = [path]
    else:
        raise UserError(f"--videos {text!r} is neither a folder nor a glob that matches anything")
    if not found:
        raise UserError(f"no videos found in {text!r}; expected {', '.join(VIDEO_SUFFIXES)} files or folders of "
                        "frame images")
    return sorted(found, key=_natural_key)


def write_video(path: str | Path, frames: np.ndarray, fps: int = 10) -> Path:
    """Write uint8 ``[T,H,W,3]`` frames as ``.mp4``/``.webm`` (PyAV), ``.gif`` (PIL) or, for a path without a
    suffix, a folder of PNGs ``00000.png, ...``; atomically. Note: PIL merges identical consecutive GIF frames,
    and mp4/webm are lossy (yuv420p, even sizes); use a frame folder for exact frames."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise UserError(f"frames must be a non-empty uint8 [T,H,W,3] array, got {frames.dtype} {frames.shape}")
    suffix = path.suffix.lower()
    if suffix == "":
        return _write_folder(path, frames)
    with atomic_path(path) as tmp:
        if suffix == ".gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps),
                           loop=0)
        elif suffix in (".mp4", ".webm"):
            _write_av(tmp, frames, fps, "libx264" if suffix == ".mp4" else "libvpx-vp9", suffix[1:])
        else:
            raise UserError(f"cannot write video {str(path)!r}: use .mp4, .webm, .gif or a folder")
    return path


def _write_av(tmp: Path, frames: np.ndarray, fps: int, codec: str, fmt: str) -> None:
    import av

    with av.open(str(tmp), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1] - frames.shape[1] % 2, frames.shape[2] - frames.shape[2] % 2
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12"}
        for frame in frames:
            even = np.ascontiguousarray(frame[:stream.height, :stream.width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(even, format="rgb24")))
        container.mux(stream.encode())


def _write_folder(path: Path, frames: np.ndarray) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"frame folder {str(path)!r} already exists and is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, folder_mode())  # the mode of a plain mkdir, not mkdtemp's 0700
    try:
        for index, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"{index:05d}.png")
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


__all__ = ["read_video", "find_videos", "write_video", "frame_files", "VIDEO_SUFFIXES"]
