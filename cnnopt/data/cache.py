"""A cache of decoded image folders, so a second study or a resume on the same folder starts in seconds.

Layout, one entry per folder state: `<cache>/<key>/images.npy` (uint8 `(N, C, S, S)`, every image of
the folder in listing order, memory-mappable), `<key>/index.json` (class names, labels, relative
paths, which rows are which part), `<key>/hashes.npy` (each image's hash, `duplicates.image_hashes`:
what finds val and test images that copy train images without reading the images again), and
`<key>/train-<hash>.npy`, a train split written out once for
streaming when it exceeds the memory limit (`train-<hash>+<hash>.npy`: that split with the val
images after it, for a final training on train + val). `<key>` hashes the folder's absolute path,
each file's relative path, size and mtime, the image side and the decoder's version, so a changed,
added or removed file (or another `data.image_size`) is another entry. Entries are written into a `.tmp-*`
folder and renamed into place, so a killed process leaves no half entry, only a `.tmp-*` folder that
is never read. Deleting the cache folder clears it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cnnopt.data.decode import DECODE_VERSION, unreadable
from cnnopt.data.duplicates import HASH_BYTES, image_hashes
from cnnopt.errors import UsageError, warn_once

CACHE_ENV = "CNNOPT_CACHE"
COPY_ROWS = 1024  # images per step when writing a train split: bounded memory, large sequential writes
HASHES = "hashes.npy"


@dataclass
class Entry:
    folder: Path
    images: np.ndarray  # (N, C, S, S) uint8, memory-mapped copy-on-write: reads come from the file
    index: dict  # class_names, labels, paths, parts {name: [first row, end row]}


def cache_folder(setting: str) -> Path:
    """data.cache_dir, else $CNNOPT_CACHE, else ~/.cache/cnnopt."""
    return Path(setting or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cnnopt").expanduser()


def folder_key(root: Path, files: list[Path], size: int) -> str:
    """A hash of what the decoded images depend on: the files (path, size, mtime) and the decoding.

    Args:
        root: the image folder; files are keyed by their path relative to it.
        files: every image file, in the order they are decoded.
        size: the side the images are decoded to.
    Returns:
        24 hex digits naming the entry.
    """
    digest = hashlib.sha256(json.dumps([DECODE_VERSION, size, str(root.resolve())]).encode())
    for path in files:
        try:
            stat = path.stat()
        except OSError as exc:  # a broken link, a file removed since the folder was listed
            raise unreadable(path, exc) from None
        # surrogateescape: a name that is no UTF-8 (Latin-1 from an old zip) is hashed by its bytes, not refused
        digest.update(f"\n{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]


def load(cache: Path, key: str) -> Entry | None:
    """The entry for `key`, or None when there is none (or it is unreadable, and so removed)."""
    folder = cache / key
    if not folder.is_dir():
        return None
    try:
        index = json.loads((folder / "index.json").read_text())
        images = np.load(folder / "images.npy", mmap_mode="c")
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(index["labels"]):
            raise ValueError("the images do not match the index")
    except (OSError, ValueError, KeyError) as exc:  # a disk error or a hand edit: decode again rather than fail
        print(f"warning: ignoring the damaged cache entry {folder} ({exc}); decoding again", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return Entry(folder, images, index)


def store(cache: Path, key: str, decode: Callable[[Callable], np.ndarray], index: dict, max_bytes: int) -> Entry:
    """Decode straight into a new entry's file, then rename the entry into place.

    Args:
        cache: the cache folder.
        key: from `folder_key`.
        decode: called with an `allocate(shape)` that makes the memory-mapped images file; fills it.
        index: what `Entry.index` holds (JSON-serialisable).
        max_bytes: the most the images can take, checked against the free disk space first.
    Returns:
        The entry, read back from its final place.
    """
    with writing(cache):
        cache.mkdir(parents=True, exist_ok=True)
        _check_space(cache, max_bytes)
        temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
        os.chmod(temporary, 0o777 & ~umask())  # mkdtemp's 0700 kept a shared cache_dir's entries from the others
    try:
        path = temporary / "images.npy"

        def allocate(shape: tuple[int, ...]) -> np.ndarray:
            with writing(cache):
                return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)

        images = decode(allocate=allocate)  # decoding's own errors (a pool's, a file's) pass through as they are
        with writing(cache):
            images.flush()
            np.save(temporary / HASHES, image_hashes(images))  # just written: read back from the page cache
            del images
            (temporary / "index.json").write_text(json.dumps(index))
            try:
                temporary.rename(cache / key)
            except OSError:
                if not (cache / key / "index.json").is_file():  # not a concurrent study that stored it first
                    raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    _say_older(cache, key, index)
    return load(cache, key)


def umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux): setting it to read it
    would, for a moment, give another thread's new files the wrong mode."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _say_older(cache: Path, key: str, index: dict) -> None:
    """Say the entries of the same folder at the same size that a new one replaces (its files changed since:
    one touched file is a new entry, and the old stay, 236 MB each for 20,000 photos at 64 px). They are not
    removed: a study still running may read its train split from one."""
    older = []
    for folder in cache.iterdir():
        if folder.name == key or folder.name.startswith("."):
            continue
        try:
            other = json.loads((folder / "index.json").read_text())
        except (OSError, ValueError):
            continue
        if other.get("root") == index["root"] and other.get("image_size") == index["image_size"]:
            older.append(folder)
    if older:
        size = sum(path.stat().st_size for folder in older for path in folder.rglob("*") if path.is_file())
        warn_once(f"the image cache {cache} holds {len(older)} older decoded cop{'ies' if len(older) > 1 else 'y'} of "
                  f"{index['root']} ({megabytes(size)}), from before its files changed (or an older cnnopt); remove "
                  f"them unless a study still running reads one: rm -r "
                  f"{' '.join(shlex.quote(str(folder)) for folder in older)}")


def stored_hashes(entry: Entry) -> np.ndarray:
    """The hashes of the entry's images (`duplicates.image_hashes`), `(N, HASH_BYTES)` uint8: stored with the
    entry, so a load reads 16 bytes an image rather than every image. An entry written before they were
    (or with a damaged file) has them computed once and added, where the cache can be written."""
    path = entry.folder / HASHES
    try:
        hashes = np.load(path)
        if hashes.dtype == np.uint8 and hashes.shape == (len(entry.images), HASH_BYTES):
            return hashes
    except (OSError, ValueError, EOFError):  # EOFError: an empty file
        pass
    hashes = image_hashes(entry.images)
    temporary = path.with_name(f".tmp-{os.getpid()}-{HASHES}")
    try:
        np.save(temporary, hashes)
        os.replace(temporary, path)
    except OSError:  # a cache shared read-only: they are computed again next time, nothing is lost
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return hashes


def train_split(entry: Entry, rows: np.ndarray) -> Path:
    """The images at `rows` written once as their own memory-mappable file in the entry.

    A split is a scattered, seeded sample of the folder; written out contiguously, a training run can
    read it as one tensor over a file, page by page.

    Args:
        entry: the cache entry holding the images.
        rows: sorted row numbers of the entry's images.
    Returns:
        The file's path; the same rows give the same file.
    """
    path = entry.folder / f"train-{hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest()[:16]}.npy"

    def fill(out: np.ndarray) -> None:
        for first in range(0, len(rows), COPY_ROWS):
            out[first:first + COPY_ROWS] = entry.images[rows[first:first + COPY_ROWS]]

    return _write_once(path, (len(rows), *entry.images.shape[1:]), fill)


def appended(path: str | Path, extra: torch.Tensor) -> Path:
    """The images of the `.npy` file at `path` followed by `extra`, written once as a file beside it.

    A final training on train + val (`search.final_data`) reads a streamed train split this way, rather
    than joining both in memory. Written in steps of COPY_ROWS, so memory stays bounded.

    Args:
        path: a train split's file (`train_split`).
        extra: uint8 images of the same shape, in memory (the val split).
    Returns:
        The joined file's path; the same file and images give the same path.
    """
    path = Path(path)
    images = np.load(path, mmap_mode="r")
    extra = extra.numpy()
    if extra.shape[1:] != images.shape[1:] or extra.dtype != images.dtype:
        raise ValueError(f"images of shape {extra.shape[1:]} cannot follow {images.shape[1:]}")
    digest = hashlib.sha256(np.ascontiguousarray(extra).tobytes()).hexdigest()[:16]

    def fill(out: np.ndarray) -> None:
        for first in range(0, len(images), COPY_ROWS):
            rows = slice(first, min(first + COPY_ROWS, len(images)))
            out[rows] = images[rows]
        out[len(images):] = extra

    shape = (len(images) + len(extra), *images.shape[1:])
    return _write_once(path.with_name(f"{path.stem}+{digest}.npy"), shape, fill)


def _write_once(path: Path, shape: tuple[int, ...], fill: Callable[[np.ndarray], None]) -> Path:
    """A uint8 `.npy` file of `shape` at `path`, filled by `fill(array)` unless it exists: written under a
    temporary name and renamed into place, so a killed process leaves no half file at `path`."""
    if path.is_file():
        return path
    _check_space(path.parent, int(np.prod(shape)))
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with writing(path.parent):
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)
            fill(out)
            out.flush()
            del out
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def open_images(path: str | Path) -> torch.Tensor:
    """A uint8 `.npy` file as a tensor over the file (copy-on-write: reads page in, nothing is written back)."""
    try:
        array = np.load(path, mmap_mode="c")
    except FileNotFoundError:
        raise UsageError(f"the streamed train split {path} is missing: on a Ray cluster, put data.cache_dir on "
                         "storage every node reaches at the same path, or copy the cache folder to each node") from None
    return torch.from_numpy(array)


@contextlib.contextmanager
def writing(folder: Path):
    """A write into the cache: a folder that cannot be written (permissions, a read-only mount, a quota) is
    one line saying so and how to go on, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"cannot write the decoded-image cache in {folder} ({exc}); set data.cache_dir (or "
                         f"${CACHE_ENV}) to a writable folder, or data.cache=false") from None


def megabytes(count: float) -> str:
    """Bytes as a message says them: megabytes to one decimal, kilobytes below one."""
    return f"{count / 2**20:,.1f} MB" if count >= 2**20 - 2**9 else f"{count / 2**10:,.1f} KB"


def _check_space(folder: Path, needed: int) -> None:
    """Fail before writing: a memory-mapped write to a full disk kills the process (SIGBUS)."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UsageError(f"the decoded images need {megabytes(needed)} in {folder} but {megabytes(free)} are "
                         "free; free space there or set data.cache_dir to another disk")
