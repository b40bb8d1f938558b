"""Image files decoded into uint8 arrays `(N, C, S, S)`: in parallel, and JPEGs at reduced scale.

Photos are decoded far larger than a CNN trains on, so two things make a folder of them fast:
libjpeg's DCT scaling (Pillow's `Image.draft`) decodes a JPEG at 1/2, 1/4 or 1/8 of its size
directly, and the files are spread over threads. Threads, not processes: libjpeg (in Pillow) and
torch's resize release the GIL, which leaves it held for a small share of each image, and a thread
starts at once, while a spawned worker process imports torch and the driver's main module (Ray,
MLflow) first, which took 8 s for 2 workers on the 2-core CI machine, longer than decoding 300
photos. The resize to the training side stays the tensor op the exported Predictor uses
(`resize_center_crop`), so only the draft step moves pixels, by a measured bound (see DRAFT_MARGIN).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cnnopt.cli import counted, logging_to
from cnnopt.errors import UsageError, last_line, warn_once

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Part of the decoded-data cache's key: bump it whenever a change here changes the pixels produced.
# 1 = full-scale decode (before the cache existed); 2 = JPEG draft at DRAFT_MARGIN x the target side;
# 3 = 16-bit gray scaled by its bit depth (a dark image was scaled by 255 as if it were 8-bit);
# 4 = 16-bit gray with a transparency key scaled too, its key as alpha (it was clipped to 8 bits: white);
# 5 = float gray within [0, 1] scaled by 1 (it was read as 0..255: black);
# 6 = a PGM of more than 8 bits (Pillow's mode I) scaled by 16 bits (a dark one was read as 8-bit: x257);
# 7 = turned upright by its EXIF orientation, as a viewer shows it (a phone's portrait photo was on its side).
DECODE_VERSION = 7
# JPEGs are drafted (libjpeg's DCT scaling to 1/2, 1/4 or 1/8) to at least 2x the target side, and
# the antialiased resize does the rest. On photos that differs from the full-scale decode by a mean
# of ~0.5 gray levels per pixel (worst image ~0.8, tests/test_data_cache.py bounds it at 1.0); a
# margin of 1 drafts further and differs by up to ~2.4 at 64 px.
DRAFT_MARGIN = 2
NAMED_FAILURES = 5  # unreadable files named in the error line; all of them go to the log file
CHUNK = 32  # images per task: big enough that a task's overhead vanishes, small for even load balance
PROGRESS_SECONDS = 5.0  # a progress line this often, so only folders that take longer show one


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (antialiased) and centre-crop to `size` x `size`."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    from torchvision.transforms.v2 import functional as TF  # here, not at import: ~1.5 s of every Ray worker's start

    x = TF.resize(x, [size], antialias=True)
    return TF.center_crop(x, [size, size])


def to_uint8(array: np.ndarray, mode: str = "", file_format: str = "") -> np.ndarray:
    """Gray pixels of a wider type (16-bit, 32-bit, float) scaled into 0..255: a 16-bit file (Pillow mode
    I;16..., or a PGM of more than 8 bits, which Pillow reads as mode I scaled to 16 bits) by its bit depth,
    so a dark image stays dark; a float one within [0, 1] (the usual range of float images) by 1; other
    32-bit or float ones, whose depth the file does not say, by the smallest of 8 bits, 16 bits or their own
    maximum that holds them."""
    if array.dtype == np.uint8:
        return array
    if mode.startswith("I;16") or (mode == "I" and file_format == "PPM"):  # a dark 16-bit PGM read as 8-bit: x257
        top = 65535.0
    elif array.dtype.kind == "f" and array.max(initial=0) <= 1.0:
        top = 1.0
    else:
        top = 255.0 if array.max(initial=0) <= 255 else (65535.0 if array.max() <= 65535 else float(array.max()))
    return np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def eight_bit_gray(image):
    """A 16-bit, 32-bit or float gray Pillow image as 8 bits (`to_uint8`: scaled, not clipped), with its
    transparency key (a 16-bit PNG's tRNS chunk, in 16-bit values) kept as an alpha channel: mode L, or LA
    where the file has a key. Training's decode and `cnnopt.predict` both read such files through it."""
    from PIL import Image

    array = np.asarray(image)
    gray = Image.fromarray(to_uint8(array, image.mode, image.format or ""))
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return gray
    return Image.merge("LA", (gray, Image.fromarray(np.where(array == key, 0, 255).astype(np.uint8))))


SYSTEM_FILES = {"thumbs.db", "desktop.ini"}  # what file managers leave in folders: never an image


def image_files(folder: Path, others: list[Path] | None = None) -> list[Path]:
    """The image files under `folder`, at any depth, sorted: by extension (IMAGE_EXTENSIONS), skipping hidden
    files and folders (`.ipynb_checkpoints/`, macOS's `._name.png` copies) and folders named like images.
    Linked folders are followed, each real folder once (Path.rglob skipped a link to a folder inside a class
    folder without a word), except a link up the tree; a folder that cannot be listed is an error, not skipped.
    A broken link stays listed, so that reading it says so. `others`, where given, gets the files of other
    extensions that are not hidden or a file manager's (a .jfif or .heic photo, say), so they can be said."""
    def refuse(error: OSError) -> None:
        raise UsageError(f"cannot list folder {error.filename}: {error.strerror}; make it readable or remove it")

    def up_the_tree(real_top: str, name: str) -> bool:
        """A folder that is `real_top` or holds it: a link to the class's own folder, or to the root above it
        (its sibling classes' images would be read as this class's), or to / or ~."""
        real = os.path.realpath(os.path.join(real_top, name))
        return os.path.commonpath([real, real_top]) == real

    found, seen = [], set()
    for top, folders, files in os.walk(folder, onerror=refuse, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a second link to one folder
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".") and not up_the_tree(real, name)]
        found += [Path(top) / name for name in files  # a broken link is among the files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
        if others is not None:
            others += [Path(top) / name for name in files if not name.startswith(".") and name.lower() not in
                       SYSTEM_FILES and Path(name).suffix.lower() not in IMAGE_EXTENSIONS]
    return sorted(found)


def orientation_of(image) -> int:
    """The image's EXIF orientation, 1 (as stored) to 8; 1 where it has none, or none Pillow can read (a PNG's or
    WebP's malformed EXIF raises in Pillow, where one odd file must not stop a whole folder's load)."""
    from PIL import ExifTags

    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return orientation if orientation in range(1, 9) else 1  # out of the standard's range: means nothing


def upright(image, orientation: int | None = None):
    """The image as a viewer shows it: turned or mirrored by its EXIF orientation tag (a phone stores a portrait
    photo as landscape pixels tagged "rotate 90"), or by `orientation` where the caller read it already.
    Training and `cnnopt.predict` both read images so, and agree."""
    from PIL import Image

    orientation = orientation_of(image) if orientation is None else orientation
    if orientation == 1:
        return image
    methods = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}  # EXIF's meaning of each value, as ImageOps.exif_transpose reads it
    return image.transpose(methods[orientation])


def _oriented(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """`upright`'s turn of a (..., H, W) tensor: the same pixels as turning the image first."""
    if orientation in (5, 6, 7, 8):
        x = x.transpose(-1, -2)
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation, ())
    return x.flip(flips) if flips else x


def say_not_read(others: list[Path], where: str) -> None:
    """One warning for the files `image_files` left out as of other types (`others`), counted by type: a .jfif
    or .heic photo was left out without a word (QA: 101 of a class's 105 files read). `where`: "under ROOT"."""
    if others:
        kinds = collections.Counter(path.suffix.lower() or "no extension" for path in others)
        verb = "is" if len(others) == 1 else "are"
        warn_once(f"{counted(len(others), 'file')} {where} {verb} not read, not being of an image type cnnopt reads "
                  f"({', '.join(f'{count} {kind}' for kind, count in kinds.most_common(4))}; e.g. {others[0]}); "
                  f"convert the photos among them to one of {', '.join(IMAGE_EXTENSIONS)}")


def unreadable(path: Path, error: Exception) -> UsageError:
    """What an image file that cannot be read (or listed: a broken link) says, wherever it is met."""
    from PIL import Image

    if isinstance(error, Image.DecompressionBombError):  # a real photo can be this big (200-megapixel phones)
        return UsageError(f"cannot read image {path}: {_reason(error)}; shrink it ({SHRINK}) or remove it")
    return UsageError(f"cannot read image {path}: {error}; remove or replace the file")


SHRINK = "e.g. mogrify -resize '8000x8000>' with ImageMagick: training resizes it far smaller"


def _reason(error: Exception) -> str:
    """Why an image cannot be read, in a few words: Pillow's own, or what its guard against decompression bombs
    means."""
    from PIL import Image

    if isinstance(error, Image.DecompressionBombError):
        size = str(error).split(", could be")[0].rstrip(".")
        return f"{size}, Pillow's guard against decompression bombs"
    return last_line(error)


def unreadable_files(failures: list[tuple[Path, Exception]]) -> UsageError:
    """All the files of a folder that cannot be read, in one line: one file as `unreadable` says it; more, counted
    with the first `NAMED_FAILURES` and their reasons (all of them in the log file, where it can be written), so
    that one run finds every file to remove or replace, not one a run (each decoding the folder up to the next)."""
    if len(failures) == 1:
        return unreadable(*failures[0])
    from PIL import Image

    log = logging_to()
    if log is not None:  # else nothing takes the records but Python's last resort: a line each on the console
        for path, error in failures:
            logging.getLogger(__name__).error("cannot read image %s: %s", path, _reason(error))
    named = "; ".join(f"{path}: {_reason(error)}" for path, error in failures[:NAMED_FAILURES])
    more = (f"; and {len(failures) - NAMED_FAILURES} more" + (f", every one listed in {log}" if log is not None else "")
            if len(failures) > NAMED_FAILURES else "")
    big = any(isinstance(error, Image.DecompressionBombError) for _, error in failures)
    return UsageError(f"{len(failures)} images cannot be read ({named}{more}); remove or replace them"
                      + (f" (shrink those over Pillow's limit: {SHRINK})" if big else ""))


def image_mode(path: Path) -> str:
    """The file's Pillow mode, read from its header only."""
    try:
        return _mode(path)
    except Exception as exc:
        raise unreadable(path, exc) from None


def _mode(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return image.mode


def decode_image(path: Path, channels: int, size: int, *, draft: bool = True) -> np.ndarray:
    """Decode one image file to uint8 `(channels, size, size)`.

    Args:
        path: the image file; transparent images are composited on white, wide gray scaled to 8 bits.
        channels: 1 (gray) or 3 (RGB).
        size: the side after resizing the shorter side and centre-cropping.
        draft: decode JPEGs at reduced scale (DRAFT_MARGIN); False is the full-scale decode of
            DECODE_VERSION 1, kept as the reference the draft is measured against.
    Returns:
        The image as a C-contiguous uint8 array.
    """
    try:
        return _decode(path, channels, size, draft)
    except Exception as exc:
        raise unreadable(path, exc) from None


def _decode(path: Path, channels: int, size: int, draft: bool) -> np.ndarray:
    """`decode_image`, raising what Pillow (or the file system) raised."""
    from PIL import Image

    with Image.open(path) as image:
        full_size = image.size  # (width, height) before any draft
        # Only JPEGs implement draft (None elsewhere); it returns the full image's box in drafted pixels.
        drafted = image.draft(image.mode, (size * DRAFT_MARGIN, size * DRAFT_MARGIN)) if draft else None
        image.load()
        # A drafted JPEG is turned upright after its resize (`_resize_drafted`): its last drafted row and column
        # are partial, at the bottom and right as stored, which a turn would move to the top or left.
        drafting = drafted is not None and drafted[1][2] < full_size[0]
        orientation = orientation_of(image)
        if not drafting:
            image = upright(image, orientation)
        if image.mode.startswith("I") or image.mode == "F":  # 16-bit or float gray: scale to 8 bits, not clip
            image = eight_bit_gray(image)
        if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
            image = _flatten_alpha(image.convert("RGBA"), Image)
        image = image.convert("L" if channels == 1 else "RGB")
        array = np.asarray(image, dtype=np.uint8).copy()
    x = torch.from_numpy(array).unsqueeze(0) if channels == 1 else torch.from_numpy(array).permute(2, 0, 1)
    if drafting:
        return _resize_drafted(x.unsqueeze(0), full_size, drafted[1], size, orientation)[0].contiguous().numpy()
    return resize_center_crop(x.unsqueeze(0), size)[0].contiguous().numpy()


def _resize_drafted(x: torch.Tensor, full_size: tuple[int, int], box: tuple, size: int,
                    orientation: int = 1) -> torch.Tensor:
    """`resize_center_crop` of the full image turned upright by its EXIF `orientation`, computed from its drafted
    copy `x` (1, C, h, w) as stored.

    A drafted pixel covers k x k full pixels, but the drafted side is rounded up (a 812 px side at 1/8
    is 102 px, not 101.5), so resizing it to a size would stretch the image by up to half a drafted
    pixel and move the crop. Scaling by the full image's exact factors instead keeps every output
    pixel where the full-scale resize puts it (mean difference ~0.5 levels instead of ~3-6); the partial
    pixels' overhang is trimmed, then the image turned, then centre-cropped (the resize rule is the same for
    both sides swapped).
    """
    width, height = full_size
    if width <= height:  # torchvision's rule for resize([size]): the long side is truncated
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    # Drafted px -> output px; a hair over, so that flooring the output size never loses a row to rounding.
    factors = tuple(full / drafted * new / full * (1 + 1e-9)
                    for full, drafted, new in ((height, box[3], new_height), (width, box[2], new_width)))
    x = torch.nn.functional.interpolate(x, scale_factor=factors, mode="bilinear", antialias=True,
                                        align_corners=False, recompute_scale_factor=False)
    x = _oriented(x[..., :new_height, :new_width], orientation)
    new_height, new_width = x.shape[-2:]
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def decode_files(paths: Sequence[Path], size: int, *, workers: int,
                 allocate: Callable[[tuple[int, ...]], np.ndarray] = lambda shape: np.empty(shape, np.uint8),
                 label: str = "") -> np.ndarray:
    """Decode image files into one uint8 array, gray if every file is gray, else RGB.

    Args:
        paths: the files, in the order their images take in the result.
        size: the side of every decoded image.
        workers: threads to decode with; 1 decodes in the calling thread.
        allocate: makes the `(N, C, size, size)` uint8 result, e.g. a memory-mapped file, so a folder
            larger than memory is written straight to disk.
        label: names the folder in progress lines.
    Returns:
        What `allocate` made, filled: image i is the decoded `paths[i]`.
    """
    chunks = [list(paths[first:first + CHUNK]) for first in range(0, len(paths), CHUNK)]
    # each pass goes through every file, and names all it could not read
    with _threads(workers, len(chunks)) as pool:
        modes = [mode for chunk in _in_order(pool, _modes, [(chunk,) for chunk in chunks], workers) for mode in chunk]
    if failures := [(path, mode) for path, mode in zip(paths, modes) if isinstance(mode, Exception)]:
        raise unreadable_files(failures)
    channels = 1 if all(mode in GRAYSCALE_MODES for mode in modes) else 3
    out = allocate((len(paths), channels, size, size))
    progress = _Progress(len(paths), label)
    first = 0
    with contextlib.closing(decode_chunks(paths, channels, size, workers=workers)) as decoded:
        for chunk, images, errors in decoded:
            out[first:first + len(images)] = images
            failures += [(path, error) for path, error in zip(chunk, errors) if error is not None]
            first += len(images)
            progress.update(first)
    progress.finish()
    if failures:
        raise unreadable_files(failures)
    return out


def decode_chunks(paths: Sequence[Path], channels: int, size: int, *, workers: int,
                  chunk: int = CHUNK) -> Iterator[tuple[list[Path], np.ndarray, list[Exception | None]]]:
    """The files decoded as training decodes them, in order, a chunk at a time, over `workers` threads.

    Args:
        chunk: the most images per chunk; fewer where that leaves a thread idle (40 files on 16 threads: 3 each).
    Yields:
        (the chunk's paths, their uint8 images `(n, channels, size, size)` with zeros for a file that cannot be
        read, and for each file None or what reading it raised). While the caller holds a chunk, the next
        2 x `workers` are decoding; torch runs one thread meanwhile (each decoding thread resizes alone).
        Close it (`contextlib.closing`) where the caller may stop early (an error, a Ctrl-C): that restores
        torch's threads and stops the decoding within a file per thread (a chunk of large PNGs took seconds).
    """
    chunk = max(1, min(chunk, -(-len(paths) // max(1, workers))))
    chunks = [list(paths[first:first + chunk]) for first in range(0, len(paths), chunk)]
    stop = threading.Event()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # N threads x N torch threads would oversubscribe
    try:
        with _threads(workers, len(chunks), stop) as pool:
            tasks = [(files, channels, size, stop) for files in chunks]
            for files, (images, errors) in zip(chunks, _in_order(pool, _decode_chunk, tasks, workers)):
                yield files, images, errors
    finally:
        torch.set_num_threads(torch_threads)


@contextlib.contextmanager
def _threads(workers: int, tasks: int, stop: threading.Event | None = None):
    """A pool of `workers` threads where there is more than one of each, else None (the calling thread); a
    caller that leaves early sets `stop` (for the tasks that check it) and cancels what was not started."""
    pool = ThreadPoolExecutor(workers) if workers > 1 and tasks > 1 else None
    try:
        yield pool
    finally:
        if stop is not None:
            stop.set()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _in_order(pool: ThreadPoolExecutor | None, function, tasks: list[tuple], workers: int):
    """Yield function(*task) for each task in order, at most 2 tasks per worker in flight (bounded memory)."""
    if pool is None:
        for task in tasks:
            yield function(*task)
        return
    pending = {}
    submitted = 0
    for index in range(len(tasks)):
        while submitted < len(tasks) and submitted < index + 2 * workers:
            pending[submitted] = pool.submit(function, *tasks[submitted])
            submitted += 1
        yield pending.pop(index).result()


def _modes(paths: list[Path]) -> list[str | Exception]:
    """Each file's mode, or what reading its header raised."""
    modes: list[str | Exception] = []
    for path in paths:
        try:
            modes.append(_mode(path))
        except Exception as exc:
            modes.append(exc)
    return modes


def _decode_chunk(paths: list[Path], channels: int, size: int,
                  stop: threading.Event | None = None) -> tuple[np.ndarray, list[Exception | None]]:
    """The files decoded (zeros for one that cannot be), and for each None or what decoding it raised; where
    `stop` is set, the rest are left (the caller has gone)."""
    images, errors = np.zeros((len(paths), channels, size, size), np.uint8), []
    for row, path in enumerate(paths):
        if stop is not None and stop.is_set():
            break
        try:
            images[row] = _decode(path, channels, size, draft=True)
            errors.append(None)
        except Exception as exc:
            errors.append(exc)
    return images, errors


def _flatten_alpha(image, Image):
    """Composite a transparent image on white, as a viewer shows it."""
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image)


class _Progress:
    """A line on stderr every PROGRESS_SECONDS while decoding, and one at the end if any was shown."""

    def __init__(self, total: int, label: str):
        self.total, self.label = total, label
        self.start = self.last = time.perf_counter()
        self.shown = False

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_SECONDS or done >= self.total:
            return
        rate = done / (now - self.start)
        print(f"decoding {self.label}: {done:,}/{self.total:,} images, {rate:,.0f} img/s, "
              f"~{(self.total - done) / rate:.0f} s left", file=sys.stderr, flush=True)
        self.last, self.shown = now, True

    def finish(self) -> None:
        if self.shown:
            seconds = time.perf_counter() - self.start
            print(f"decoded {self.label}: {self.total:,} images in {seconds:.0f} s "
                  f"({self.total / seconds:,.0f} img/s)", file=sys.stderr, flush=True)
