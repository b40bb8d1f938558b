"""Exact copies across the splits: val and test images whose pixels are a train image's.

The same photo saved in train/ and test/, or one file under two names, makes a score optimistic: the
model is scored on an image it trained on. Each image is hashed (BLAKE2b of its uint8 pixels, 16 bytes;
exact equality only, no near-duplicate search); a val image is a copy where its hash is a train image's,
a test image where it is a train or a val image's. `data.duplicates` says what follows: `warn` (one
line), `drop` (the copies leave val and test, one line) or `error`. The train split never changes.
A source without a cache entry to store its hashes in (digits, CIFAR-10, an uncached folder) is hashed
once per process (`source_hashes`): a budgeted study loads its data up to five times (its start, the
search's subset, the confirmation, the final training, the promotion).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch

from cnnopt.errors import UsageError, say_once

HASH_BYTES = 16  # 128 bits: no two different images of any dataset share one by chance
REMEMBERED_SOURCES = 4  # a study's one source, with room for a notebook's few; 16 bytes an image each
_remembered: dict[Hashable, dict[str, np.ndarray]] = {}  # source -> its parts' hashes, the least recently used first


def image_hashes(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Each image's hash: `(N, HASH_BYTES)` uint8 rows, of uint8 images `(N, ...)` in memory or memory-mapped
    (read once, in order). CIFAR-10's 60,000 images take 0.2-0.3 s on one core of the 2-core CI machine."""
    array = images.numpy() if isinstance(images, torch.Tensor) else images
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    digests = b"".join(hashlib.blake2b(image, digest_size=HASH_BYTES).digest() for image in array)
    return np.frombuffer(digests, np.uint8).reshape(len(array), HASH_BYTES).copy()


def source_hashes(source: Hashable, parts: dict[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
    """Each part's `image_hashes`, computed once per process for a source: later loads of it (a budget's subset,
    the confirmation, the final training, the promotion) reuse them rather than read every image again
    (`image_hashes`' 0.2-0.3 s for CIFAR-10).

    Args:
        source: what identifies the parts' bytes, taken before they were read (each file's resolved path, size
            and mtime): a changed file must make another key, so it is hashed again.
        parts: {part name: uint8 images `(N, ...)`}, as `image_hashes` takes them.
    Returns:
        {part name: `(N, HASH_BYTES)` uint8 hashes}, read-only: every load of the source shares them.
    """
    hashes = _remembered.pop(source, None)
    if hashes is None or [(name, len(rows)) for name, rows in hashes.items()] != [
            (name, len(images)) for name, images in parts.items()]:  # a key that missed a change: hash again
        hashes = {name: image_hashes(images) for name, images in parts.items()}
        for rows in hashes.values():
            rows.flags.writeable = False
    _remembered[source] = hashes  # the most recently used last
    while len(_remembered) > REMEMBERED_SOURCES:
        del _remembered[next(iter(_remembered))]
    return dict(hashes)  # the caller's own dict: what it does to it leaves the remembered one as it is


@dataclass(frozen=True)
class Counts:
    """What a load found and did, as its runs record it (`provenance.duplicate_tags`): how many val and test
    images copied an earlier split's image, and whether they were left out of those splits (`handle` decides)."""

    val: int
    test: int
    dropped: bool  # the splits no longer hold them: data.duplicates = drop, and there were some
    conflicts: int = 0  # images whose pixels are also another class's image (`conflicts`), in any split


@dataclass(frozen=True)
class Copies:
    """Which val and test rows copy an earlier split's image, and the first such pair as an example."""

    val: np.ndarray  # bool, one per val image
    test: np.ndarray  # bool, one per test image
    example: tuple[str, int, str, int] | None  # (split, row, the split it copies, that split's row)
    of_val: bool = False  # some test image copies a val image that no train image equals

    @property
    def count(self) -> int:
        return int(self.val.sum() + self.test.sum())


def find(train: np.ndarray, val: np.ndarray, test: np.ndarray) -> Copies:
    """The copies among the splits' hashes (`image_hashes` rows of each)."""
    keys = {name: np.ascontiguousarray(rows).view(f"V{HASH_BYTES}").ravel()
            for name, rows in (("train", train), ("val", val), ("test", test))}
    val_copies = np.isin(keys["val"], keys["train"])
    test_of_train = np.isin(keys["test"], keys["train"])
    test_copies = test_of_train | np.isin(keys["test"], keys["val"])
    example = None
    for split, copies in (("val", val_copies), ("test", test_copies)):
        if copies.any():
            row = int(np.flatnonzero(copies)[0])
            source = "train" if split == "val" or test_of_train[row] else "val"
            example = (split, row, source, int(np.flatnonzero(keys[source] == keys[split][row])[0]))
            break
    return Copies(val_copies, test_copies, example, bool((test_copies & ~test_of_train).any()))


def conflicts(hashes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The images whose pixels appear under two or more classes, in any split: the same photo in cat/ and
    dog/, or a class folder linking to another's images. A model cannot get both labels right, and its
    scores count the one it gets wrong.

    Args:
        hashes: `image_hashes` rows of every image, `(N, HASH_BYTES)`.
        labels: each image's class, `(N,)`.
    Returns:
        A bool per image (it shares its pixels with another class's image), and the first such pair of rows.
    """
    keys = np.ascontiguousarray(hashes).view(f"V{HASH_BYTES}").ravel()
    if not len(keys):
        return np.zeros(0, bool), None
    _, group = np.unique(keys, return_inverse=True)
    group, labels = group.ravel(), np.asarray(labels).ravel()
    distinct = np.unique(np.stack([group, labels]), axis=1)[0]  # one column per (pixels, class) seen
    mixed = np.bincount(distinct, minlength=group.max() + 1)[group] > 1
    if not mixed.any():
        return mixed, None
    first = int(np.flatnonzero(mixed)[0])
    other = int(np.flatnonzero((group == group[first]) & (labels != labels[first]))[0])
    return mixed, (first, other)


def handle_conflicts(policy: str, mixed: np.ndarray, example: tuple[str, str] | None, where: str = "") -> int:
    """Say or refuse the images `conflicts` found under two classes, as `policy` (data.duplicates) asks: error
    refuses, warn and drop say it in one line (drop leaves val and test copies of train out, never train).

    Args:
        mixed, example: from `conflicts`, the example's two images named as a message names them.
        where: the folder they can be removed from ("" for a built-in dataset).
    Returns:
        How many images share their pixels with another class's image.
    """
    count = int(mixed.sum())
    if not count:
        return 0
    what = (f"{count} images are under two or more classes, pixel for pixel (e.g. {example[0]} = {example[1]}): "
            "a model cannot get both labels right, and its scores count the one it gets wrong")
    fix = f"keep each image in one class folder{f' of {where}' if where else ''}"
    if policy == "error":
        raise UsageError(f"{what}; {fix} (or set data.duplicates=warn to keep them)")
    say_once(f"warning: {what}; {fix}")
    return count


def handle(policy: str, copies: Copies, sizes: dict[str, int], name: Callable[[str, int], str],
           where: str = "") -> bool:
    """Say or refuse what `copies` found, as `policy` (data.duplicates) asks; nothing where there are none.

    Args:
        policy: warn | drop (the caller leaves the copies out) | error.
        copies: from `find`.
        sizes: the val and test splits' sizes before any image is left out.
        name: how a message names a split's image: (split, row) -> its file or its place in the dataset.
        where: the folder the copies can be removed from ("" for a built-in dataset).
    Returns:
        Whether the caller leaves the copies out of val and test: drop, and there are some.
    """
    if not copies.count:
        return False
    counts = " and ".join(f"{int(mask.sum())} of {sizes[split]} {split} images"
                          for split, mask in (("val", copies.val), ("test", copies.test)) if mask.any())
    split, row, source, source_row = copies.example
    sources = "train or val" if copies.of_val else "train"
    copy_of = (f"{'a copy' if copies.count == 1 else 'copies'} of {sources} images, pixel for pixel "
               f"(e.g. {split} image {name(split, row)} = {source} image {name(source, source_row)})")
    what = f"{counts} {'is' if copies.count == 1 else 'are'} {copy_of}"
    remove = f"remove the copies from {where}, or " if where else ""
    if policy == "error":
        raise UsageError(f"{what}, so their scores would be optimistic; {remove}set data.duplicates=drop to leave "
                         "them out of val and test (or warn to keep them)")
    emptied = [split for split, mask in (("val", copies.val), ("test", copies.test)) if len(mask) and mask.all()]
    if policy == "drop" and emptied:  # not the generic empty-split error, which would blame val_fraction
        raise UsageError(f"data.duplicates=drop would leave no {' and no '.join(emptied)} images: {what}; {remove}set "
                         "data.duplicates=warn to keep them in the scores (which are then optimistic)")
    line = (f"data.duplicates=drop: left out {counts}, {copy_of}" if policy == "drop" else
            f"warning: {what}: their scores are optimistic; remove the copies{f' from {where}' if where else ''} or "
            "set data.duplicates=drop to leave them out of val and test")
    say_once(line)
    return policy == "drop"
