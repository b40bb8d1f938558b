"""Datasets decoded once into uint8 tensors, split train/val/test, with train-only statistics.

Every dataset takes the same path as an image file: 8-bit pixels `(N, C, H, W)`, resized and
centre-cropped to `image_size` by the same tensor op the exported Predictor uses, so training and
serving see the same pixels (JPEGs of an image folder within about a gray level: they are decoded
at reduced scale). Image folders are decoded on threads (`cnnopt.data.decode`) and kept in a cache
(`cnnopt.data.cache`); a train split larger than `data.memory_limit_mb` stays memory-mapped from
the cache and is read a batch at a time. Val and test images that copy a train image pixel for pixel
are found from per-image hashes (`cnnopt.data.duplicates`) and warned about, left out or refused, as
are images found under two classes (`_label_conflicts`).
The splits are made in three steps, in this order on one seeded generator: val and test are carved
(`_plan_splits`), their copies of train images are found (`_without_copies`), and data.subset is drawn
from the train split (`_draw_subset`).
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cnnopt.data import cache as data_cache
from cnnopt.data import duplicates
from cnnopt.data.decode import (IMAGE_EXTENSIONS, decode_files, default_workers, image_files, resize_center_crop,
                                 say_not_read)
from cnnopt.experiment.config import DataConfig, check_section
from cnnopt.errors import UsageError, warn_once

DATASETS = ("digits", "cifar10", "imagefolder")
IMAGEFOLDER_DEFAULT_SIZE = 64  # photos of any size are brought to this side unless image_size is set
DIGITS_KEY = "sklearn.datasets.load_digits"  # bundled with scikit-learn: the same pixels for a process's life


@dataclass
class ImageData:
    """Three disjoint splits of uint8 images `(N, C, H, W)` with int64 labels `(N,)`."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    mean: list[float]  # per channel, of train pixels scaled to [0, 1]
    std: list[float]
    train_path: str = ""  # set when train_x is memory-mapped from this file (the split exceeded the memory limit)
    # How many val and test images copied a train (test: or val) image when the data loaded, and whether they
    # were left out (data.duplicates = drop); None where no load made the data. Recorded on runs.
    duplicates: duplicates.Counts | None = None
    withheld: int = 0  # test images `without_test` left out (a time budget keeps the promotion's test pass)

    @property
    def streamed(self) -> bool:
        """Whether train_x is read from its file as it is indexed, rather than held in memory."""
        return bool(self.train_path)

    def __getstate__(self) -> dict:
        # Ray sends the data to trials pickled: a streamed split goes as its path, and each trial
        # process maps the file itself (so on a cluster every node needs the file at that path).
        state = dict(self.__dict__)
        if self.train_path:
            state["train_x"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.train_path and self.train_x is None:
            self.train_x = data_cache.open_images(self.train_path)

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def without_test(self) -> ImageData:
        """What a training is sent (a trial, a confirmation seed, the final training, a budget's probe): the
        test split left out, so hyperparameters and epochs are selected on validation only. The test split is
        read once, by the promotion (`cnnopt.study.trainable.check_no_test` refuses it in a worker)."""
        # New empty tensors, not [:0]: a view pickles its whole storage, so every worker got the test pixels.
        return replace(self, test_x=self.test_x.new_empty((0, *self.test_x.shape[1:])),
                       test_y=self.test_y.new_empty((0,)), withheld=self.withheld + len(self.test_y))

    def preprocessing(self) -> dict:
        """What a checkpoint needs to rebuild the eval preprocessing."""
        return {"image_size": self.image_size, "channels": self.channels, "mean": self.mean,
                "std": self.std, "class_names": list(self.class_names)}


def load_data(cfg: DataConfig) -> ImageData:
    """Load, split and summarise the dataset an experiment names.

    Args:
        cfg: the experiment's `[data]` table.
    Returns:
        ImageData with seeded, stratified, disjoint splits.
    """
    check_source(cfg)
    entry = files = None
    if cfg.dataset == "digits":
        x, y, names = _load_digits()
        parts, source = {"pool": (x, y)}, DIGITS_KEY
    elif cfg.dataset == "cifar10":
        parts, names, source = _load_cifar10(cfg)
    else:
        parts, names, entry, files, source = _load_imagefolder(cfg)
    size = cfg.image_size or (IMAGEFOLDER_DEFAULT_SIZE if cfg.dataset == "imagefolder" else 0)
    labels = {name: y for name, (_, y) in parts.items()}
    rng = np.random.default_rng(cfg.seed)
    plan = _plan_splits(labels, cfg, rng)
    hashes = _part_hashes(parts, entry, source)
    conflicts = _label_conflicts(cfg, hashes, labels, files)
    plan, copies = _without_copies(cfg, hashes, labels, plan, files)
    copies = replace(copies, conflicts=conflicts)
    plan = _draw_subset(plan, labels, cfg, rng)
    train_path = _streamed_train_path(cfg, entry, plan, parts)
    # An image folder's parts are views of one decoded array (or of the cache file): each split gets
    # its own copy, so it holds only its own images in memory.
    own = cfg.dataset == "imagefolder"
    splits = {}
    for name, (part, rows) in plan.items():
        x, y = parts[part]
        x = data_cache.open_images(train_path) if name == "train" and train_path else _take(x, rows, own)
        splits[name] = (x, _take(y, rows, False))
    if size:
        splits = {name: (resize_center_crop(x, size), y) for name, (x, y) in splits.items()}
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits["train"], splits["val"], splits["test"]
    if len(train_x) == 0 or len(val_x) == 0:
        raise UsageError(f"the {cfg.dataset} data left an empty train or val split; add images or change data.val_fraction")
    _unmeasured_classes(names, {"train": train_y, "val": val_y, "test": test_y})
    mean, std = channel_stats(train_x)
    return ImageData(train_x, train_y, val_x, val_y, test_x, test_y, names, mean, std, train_path, copies)


def _unmeasured_classes(names: list[str], splits: dict[str, torch.Tensor]) -> None:
    """Say the classes that a split (train, and val or test where it has images) holds none of: a class of one or
    two images gets no share of a split carved from them (each class's share is rounded to whole images), and
    without a word the scores never measured it (a QA folder's class of one image: a test accuracy over 3 of
    its 4 classes), or, where its one image went to val, the model never learned it."""
    present = {split: set(np.unique(y.numpy()).tolist()) for split, y in splits.items() if len(y)}
    counts = np.bincount(torch.cat(list(splits.values())).numpy(), minlength=len(names))
    missing = {label: lacking for label in range(len(names)) if counts[label]
               if (lacking := [split for split, labels in present.items() if label not in labels])}
    if not missing:
        return
    named = ", ".join(f"{names[label]!r} ({counts[label]} image{'' if counts[label] == 1 else 's'}, none in "
                      f"{' or '.join(lacking)})" for label, lacking in list(missing.items())[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    warn_once(f"{len(missing)} class{'es' * (len(missing) > 1)} {'are' if len(missing) > 1 else 'is'} missing from a "
              f"split: {named}{more}; a class with none in train is never learned, one with none in val or test never "
              "scored (a split carved from the images takes a rounded share of each class); add images to them (or "
              "remove them)")


def why_no_test(cfg: DataConfig, data: ImageData) -> tuple[str, str] | None:
    """Why the data leave an empty test split, and what gives them one (None where they leave a test image):
    a model trained on them can never be tested once, so never promoted. Said before a study trains, not
    after its last trial."""
    if len(data.test_y):
        return None
    if cfg.test_fraction == 0:
        return "data.test_fraction = 0 leaves no test split", "set data.test_fraction above 0 (the default is 0.15)"
    images = len(data.train_y) + len(data.val_y)
    return (f"data.test_fraction = {cfg.test_fraction:g} leaves no test image ({images} images: each class's "
            "share rounds to 0)", "raise data.test_fraction, or add images")


def check_source(cfg: DataConfig) -> None:
    """What can be checked of `[data]` without reading an image: the dataset's name, its settings and where
    its files are. A study checks it before it creates anything (its tracking store, Ray), so a wrong
    name or path is one line that leaves nothing behind; `load_data` checks it first too."""
    if cfg.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {cfg.dataset!r}; set data.dataset to one of {', '.join(DATASETS)}")
    check_section("data", cfg)
    if cfg.dataset == "cifar10" and not cfg.download:
        _cifar_folder(cfg)
    elif cfg.dataset == "imagefolder":
        _imagefolder_root(cfg)


def memory_limit_bytes(cfg: DataConfig) -> int:
    """data.memory_limit_mb in bytes; 0 means a quarter of physical memory (no limit where that is unknown)."""
    if cfg.memory_limit_mb > 0:
        return int(cfg.memory_limit_mb * 2**20)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        return 0


def channel_stats(x: torch.Tensor, chunk_bytes: int = 2**24) -> tuple[list[float], list[float]]:
    """Per-channel mean and (sample) std of uint8 images scaled to [0, 1], from exact integer sums: each
    channel's 256-bin histogram, counted `chunk_bytes` of images at a time, so a memory-mapped split is read
    once and memory stays bounded at any image size (2.5x faster than int64 sums of squares, which took 16x
    their chunk's size: 0.08 s against 0.21 s for 45,000 32x32 RGB images on 2 cores)."""
    channels = x.shape[1]
    rows = max(1, chunk_bytes // max(1, x[0].numel()))
    histogram = torch.zeros(channels, 256, dtype=torch.long)
    for first in range(0, x.shape[0], rows):
        chunk = x[first:first + rows]
        for channel in range(channels):
            histogram[channel] += torch.bincount(chunk[:, channel].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.long)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    sums = [int(total) for total in (histogram * values).sum(dim=1)]
    squares = [int(total) for total in (histogram * values * values).sum(dim=1)]
    mean = [total / count / 255 for total in sums]
    # In Python's integers, exactly; one rounding at the end.
    variance = [(square * count - total * total) / (count * max(1, count - 1)) / 255**2
                for total, square in zip(sums, squares)]
    return mean, [max(math.sqrt(v), 1e-3) for v in variance]  # a constant channel must not divide by zero


def _plan_splits(labels: dict[str, torch.Tensor], cfg: DataConfig,
                 rng: np.random.Generator) -> dict[str, tuple[str, np.ndarray | None]]:
    """Which rows of which part make each split: (part, sorted rows), rows None = the whole part; train is
    every image val and test leave, before `_draw_subset` samples it.

    The missing splits are carved out of the labelled pool, stratified and drawn with `rng` (seeded by
    data.seed), from the labels alone, so the split is the same whether the images are in memory, cached
    or streamed.
    """
    pool_y = labels["pool"].numpy()
    out = {}
    remaining = np.arange(len(pool_y))
    carved = False
    for name, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if name in labels:
            out[name] = (name, None)
            continue
        take = _stratified_take(pool_y[remaining], fraction / (1 - _taken(out, labels, cfg)), rng)
        chosen = remaining[take]
        out[name] = ("pool", chosen)
        remaining = np.setdiff1d(remaining, chosen)
        carved = True
    out["train"] = ("pool", remaining if carved else None)
    return out


def _draw_subset(plan: dict, labels: dict[str, torch.Tensor], cfg: DataConfig, rng: np.random.Generator) -> dict:
    """The plan with a stratified sample of data.subset train images, drawn with `rng` where `_plan_splits`
    left it; the plan itself where data.subset is 0 or every train image.

    After val and test are carved and checked for copies, so every subset size is measured on the same val
    and test images.
    """
    part, picked = plan["train"]
    part_y = labels[part].numpy()
    rows = _rows(len(part_y), picked)
    if cfg.subset > len(rows):  # the README promises exactly that many: more would silently be all of them
        raise UsageError(f"data.subset = {cfg.subset} is more than the {len(rows)} training images left once "
                         "val and test are set apart; lower it (or 0 for every image)")
    if not cfg.subset or cfg.subset == len(rows):
        return plan
    classes = len(np.unique(part_y[rows]))
    if cfg.subset < classes:
        raise UsageError(f"data.subset = {cfg.subset} keeps fewer training images than the {classes} classes; "
                         f"give at least {classes} (or 0 for every image)")
    return {**plan, "train": (part, rows[_stratified_count(part_y[rows], cfg.subset, rng)])}


def _without_copies(cfg: DataConfig, hashes: dict[str, np.ndarray], labels: dict[str, torch.Tensor], plan: dict,
                    files: dict[str, list[Path]] | None) -> tuple[dict, duplicates.Counts]:
    """Find the val and test images that copy an earlier split's image (`duplicates.find`) and act as
    data.duplicates says (`duplicates.handle`): the plan without them where they are dropped, and the counts.

    The hashes are of each part's images as loaded (`_part_hashes`): a resize maps equal images to equal
    images. Val and test are compared with the whole train split, before `_draw_subset` samples it, so
    they stay the same at every subset size (a time budget's search and its final training select on one
    val split).
    """
    rows = {split: _rows(len(labels[part]), picked) for split, (part, picked) in plan.items()}
    found = duplicates.find(*(hashes[plan[split][0]][rows[split]] for split in ("train", "val", "test")))

    def name(split: str, row: int) -> str:
        return _image_name(cfg, files, plan[split][0], int(rows[split][row]))

    dropped = duplicates.handle(cfg.duplicates, found, {split: len(rows[split]) for split in ("val", "test")}, name,
                                cfg.root if files is not None else "")
    if dropped:
        plan = {**plan, **{split: (plan[split][0], rows[split][~copied])
                           for split, copied in (("val", found.val), ("test", found.test)) if copied.any()}}
    return plan, duplicates.Counts(int(found.val.sum()), int(found.test.sum()), dropped)


def _label_conflicts(cfg: DataConfig, hashes: dict[str, np.ndarray], labels: dict[str, torch.Tensor],
                     files: dict[str, list[Path]] | None) -> int:
    """How many images, in any part, share their pixels with another class's image (`duplicates.conflicts`),
    said or refused as data.duplicates asks (`duplicates.handle_conflicts`)."""
    names = list(hashes)
    mixed, pair = duplicates.conflicts(np.concatenate([hashes[part] for part in names]),
                                       np.concatenate([labels[part].numpy() for part in names]))
    example = None
    if pair is not None:
        starts = np.cumsum([0] + [len(hashes[part]) for part in names])

        def name(row: int) -> str:
            index = int(np.searchsorted(starts, row, side="right")) - 1
            return _image_name(cfg, files, names[index], row - int(starts[index]))

        example = (name(pair[0]), name(pair[1]))
    return duplicates.handle_conflicts(cfg.duplicates, mixed, example, cfg.root if files is not None else "")


def _part_hashes(parts: dict, entry, source) -> dict[str, np.ndarray]:
    """Each part's image hashes: a cache entry's stored ones, else this process's for `source`, the key of
    the parts' bytes (`duplicates.source_hashes`): digits' and CIFAR-10's own pixels, an uncached folder's
    decoded images."""
    if entry is None:
        return duplicates.source_hashes(source, {part: x for part, (x, _) in parts.items()})
    stored = data_cache.stored_hashes(entry)
    return {part: stored[first:end] for part, (first, end) in entry.index["parts"].items()}


def _image_name(cfg: DataConfig, files: dict[str, list[Path]] | None, part: str, row: int) -> str:
    """How a message names image `row` of `part`: its file, or its index in the dataset's own order."""
    if files is not None:
        return str(files[part][row])
    if cfg.dataset == "cifar10":  # data_batch_1..5 in order (10,000 images each), or the official test batch
        return f"cifar10 test_batch #{row}" if part == "test" else f"cifar10 data_batch_{row // 10000 + 1} #{row % 10000}"
    return f"sklearn digits #{row}"  # sklearn.datasets.load_digits()'s order


def _rows(count: int, rows: np.ndarray | None) -> np.ndarray:
    """A plan's rows of a part of `count` images: None stands for all of them."""
    return np.arange(count) if rows is None else rows


def _take(x: torch.Tensor, rows: np.ndarray | None, own: bool) -> torch.Tensor:
    """x's rows (a copy), or all of x: itself, or a copy when `own`."""
    if rows is not None:
        return x[torch.from_numpy(rows)]
    return x.clone() if own else x


def _streamed_train_path(cfg: DataConfig, entry, plan: dict, parts: dict) -> str:
    """The cached train split's file when it exceeds the memory limit, else ''."""
    part, rows = plan["train"]
    x = parts[part][0]
    count = len(x) if rows is None else len(rows)
    limit = memory_limit_bytes(cfg)
    if entry is None or not limit or count * math.prod(x.shape[1:]) <= limit:
        return ""
    first = entry.index["parts"][part][0]
    return str(data_cache.train_split(entry, first + _rows(count, rows)))


def _taken(out: dict, parts: dict, cfg: DataConfig) -> float:
    """Fraction of the pool already given to test (so val is a fraction of the whole pool)."""
    return cfg.test_fraction if "test" in out and "test" not in parts else 0.0


def _stratified_take(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of about `fraction` of each class, drawn with `rng`, sorted."""
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(len(members) * fraction))
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


def _stratified_count(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of exactly `count` images (at least one per class), each class's share as close to its
    proportion as whole images allow: its share rounded down but at least 1, then images added to (or taken
    from) the classes whose share is furthest from their count; drawn with `rng`, sorted."""
    classes, sizes = np.unique(labels, return_counts=True)
    shares = sizes * count / len(labels)
    quotas = np.minimum(sizes, np.maximum(1, np.floor(shares))).astype(np.int64)
    while quotas.sum() < count:  # ties: the lower label first
        quotas[np.argmax(np.where(quotas < sizes, shares - quotas, -np.inf))] += 1
    while quotas.sum() > count:  # a small class's image of its own came out of the large ones
        quotas[np.argmin(np.where(quotas > 1, shares - quotas, np.inf))] -= 1
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:quota] for label, quota in zip(classes, quotas)]
    return np.sort(np.concatenate(chosen))


def _load_digits() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 real 8x8 scans with values 0..16, bundled with scikit-learn
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    x = torch.from_numpy(pixels).unsqueeze(1)  # (N, 1, 8, 8)
    return x, torch.from_numpy(digits.target).long(), [str(d) for d in range(10)]


def _load_cifar10(cfg: DataConfig) -> tuple[dict, list[str], tuple]:
    """CIFAR-10's parts (pool: the five train batches; test), class names, and what identifies the batches'
    bytes for `duplicates.source_hashes`: each file's resolved path, size and mtime, taken before it is read."""
    root = Path(cfg.root or "data").expanduser()
    folder = _cifar_folder(cfg, missing_ok=cfg.download)
    if not (folder / "batches.meta").exists():
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(str(root), download=True)
        except (OSError, RuntimeError) as exc:  # no network, a proxy, a checksum that does not match
            raise UsageError(f"downloading CIFAR-10 into {root} failed ({exc}); fetch cifar-10-python.tar.gz by "
                             f"hand, extract it there and set data.download=false") from None
        folder = _cifar_folder(cfg)
    names = [n.decode() if isinstance(n, bytes) else n for n in _unpickle(folder / "batches.meta")["label_names"]]
    train_files = [folder / f"data_batch_{index}" for index in range(1, 6) if (folder / f"data_batch_{index}").exists()]
    if not train_files or not (folder / "test_batch").exists():
        raise UsageError(f"{folder} lacks data_batch_* or test_batch files; re-extract the CIFAR-10 python archive there")
    if len(train_files) < 5:  # a part-extracted archive trains on fewer images than the person believes
        warn_once(f"{folder} holds {', '.join(path.name for path in train_files)} of CIFAR-10's five train "
                  "batches: the studies train on a subset; re-extract the CIFAR-10 python archive there for all 50,000")
    source = tuple(_cifar_file_key(path) for path in [*train_files, folder / "test_batch"])
    train = [_cifar_batch(path) for path in train_files]
    parts = {"pool": (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])),
             "test": _cifar_batch(folder / "test_batch")}
    return parts, names, source


def _cifar_folder(cfg: DataConfig, missing_ok: bool = False) -> Path:
    """The folder of CIFAR-10's python batches: data.root itself or its cifar-10-batches-py."""
    root = Path(cfg.root or "data").expanduser()
    folder = root if (root / "batches.meta").exists() else root / "cifar-10-batches-py"
    if not missing_ok and not (folder / "batches.meta").exists():
        raise UsageError(f"CIFAR-10 not found in {folder}: set data.root to the folder holding cifar-10-batches-py, "
                         "or set data.download=true to fetch it")
    return folder


def _cifar_file_key(path: Path) -> tuple[str, int, int]:
    """What identifies a batch file's bytes: its resolved path, size and mtime."""
    try:
        stat = path.stat()
    except OSError as exc:  # removed since the folder was listed
        raise _unreadable_cifar(path, exc) from None
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _unreadable_cifar(path: Path, error: Exception) -> UsageError:
    return UsageError(f"cannot read CIFAR-10 file {path}: {error}; re-extract the CIFAR-10 python archive there")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            raw = pickle.load(handle, encoding="bytes")
    except Exception as exc:
        raise _unreadable_cifar(path, exc) from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    try:  # a pickle of another shape or without its keys: one line naming the file, not a reshape's traceback
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
            raise ValueError(f"data {data.shape} and labels {labels.shape}, not (N, 3072) and (N,)")
    except (KeyError, ValueError, TypeError) as exc:
        raise _unreadable_cifar(path, f"no CIFAR-10 batch: {type(exc).__name__} {exc}") from None
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _load_imagefolder(cfg: DataConfig) -> tuple[dict, list[str], data_cache.Entry | None, dict[str, list[Path]], str]:
    """The folder's parts (pool, and val/test where it is pre-split), class names, cache entry (None
    with data.cache=false), each part's files, in the order of its images, and the key of the decoded
    images (`cache.folder_key`: every file's path, size and mtime, taken before decoding)."""
    root = _imagefolder_root(cfg)
    split_dirs = {"pool": root / "train", "val": root / "val", "test": root / "test"}
    if not (root / "val").is_dir() and (root / "valid").is_dir():
        split_dirs["val"] = root / "valid"
    if not split_dirs["pool"].is_dir():
        split_dirs = {"pool": root}
    else:  # beside train/, a validation/ or Test/ folder would be left out without a word
        read = {"train", "test", split_dirs["val"].name}  # valid/ is read only where there is no val/
        odd = sorted(p.name + "/" for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_LIKE
                     and p.name not in read)
        if odd:
            raise UsageError(f"{root} holds {', '.join(odd)} beside train/, which are not read: name split folders "
                             "train/, val/ (or valid/) and test/, in lower case")
    split_dirs = {name: path for name, path in split_dirs.items() if path.is_dir()}
    names = _class_names(split_dirs["pool"])
    for name, path in split_dirs.items():  # a class only val/ or test/ has would be scored as nothing at all
        extra = [folder for folder in _class_names(path, at_least=0) if name != "pool" and folder not in names
                 and image_files(path / folder)]  # not empty strays
        if extra:
            them = "them" if len(extra) > 1 else "it"
            raise UsageError(f"{path} holds class folder{'s' if len(extra) > 1 else ''} {', '.join(extra)} that "
                             f"{split_dirs['pool']} does not: a model trained there cannot predict {them}; add {them} "
                             f"to {split_dirs['pool'].name}/ or remove {them}")
    others: list[Path] = []
    files = {name: _list_images(path, names, others) for name, path in split_dirs.items()}
    say_not_read(others, f"under {root}")
    paths = [path for listed in files.values() for path, _ in listed]
    labels = torch.tensor([label for listed in files.values() for _, label in listed], dtype=torch.long)
    bounds, first = {}, 0
    for name, listed in files.items():  # the pool first, so its rows in the cache start at 0
        bounds[name] = [first, first + len(listed)]
        first += len(listed)
    size = cfg.image_size or IMAGEFOLDER_DEFAULT_SIZE
    decode = partial(decode_files, paths, size, workers=cfg.decode_workers or default_workers(), label=str(root))
    entry = None
    key = data_cache.folder_key(root, paths, size)  # also what an uncached folder's hashes are remembered by
    if cfg.cache:
        cache = data_cache.cache_folder(cfg.cache_dir)
        index = {"root": str(root.resolve()), "image_size": size, "class_names": names, "parts": bounds,
                 "labels": labels.tolist(), "paths": [str(path.relative_to(root)) for path in paths]}
        entry = data_cache.load(cache, key) or data_cache.store(cache, key, decode, index, len(paths) * 3 * size**2)
        images = torch.from_numpy(entry.images)
    else:
        images = torch.from_numpy(decode(allocate=partial(_allocate_in_memory, cfg)))
    parts = {name: (images[start:end], labels[start:end]) for name, (start, end) in bounds.items()}
    return parts, names, entry, {name: [path for path, _ in listed] for name, listed in files.items()}, key


def _imagefolder_root(cfg: DataConfig) -> Path:
    root = Path(cfg.root).expanduser()  # ~/photos, as a shell would read it (a quoted TOML string is not)
    if cfg.root and root.exists() and not root.is_dir():  # "not found" of a file that is there
        raise UsageError(f"data.root {cfg.root!r} is a file, not a folder: set data.root to the folder of class "
                         "folders (or of train/, val/, test/ folders of class folders)")
    if not cfg.root or not root.is_dir():
        raise UsageError(f"image folder {cfg.root!r} not found: set data.root to a folder of class folders "
                         "(or of train/, val/, test/ folders of class folders)")
    return root


def _allocate_in_memory(cfg: DataConfig, shape: tuple[int, ...]) -> np.ndarray:
    """The decoded images' array, refused before decoding when it would exceed the memory limit."""
    needed, limit = math.prod(shape), memory_limit_bytes(cfg)
    if limit and needed > limit:
        raise UsageError(f"the decoded images of {cfg.root} take {data_cache.megabytes(needed)}, more than the "
                         f"{data_cache.megabytes(limit)} memory limit, and data.cache=false; set data.cache=true so the "
                         "train split streams from disk, or raise data.memory_limit_mb")
    return np.empty(shape, np.uint8)


SPLIT_LIKE = {"train", "training", "val", "valid", "validation", "test", "testing"}  # a split's name, any case


def _class_names(folder: Path, at_least: int = 2) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in names:  # a Latin-1 name from an old zip: the exported model (TorchScript) cannot hold it
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"class folder {os.fsencode(folder / name)!r} is not named in UTF-8, which the model's "
                             f"class names must be; rename it (convmv -f latin1 -t utf8 -r --notest {folder} "
                             "renames them all)") from None
    if len(names) >= 2 and {name.lower() for name in names} <= SPLIT_LIKE:  # Train/ and Test/: two "classes"
        raise UsageError(f"{folder} holds {', '.join(n + '/' for n in names)}: split folders, read as classes here; "
                         "name them train/, val/ (or valid/) and test/, in lower case, each holding class folders")
    seen: dict[Path, str] = {}
    for name in names:  # two names for one folder: each of its images would be two classes
        real = (folder / name).resolve()
        if real in seen:
            link = name if (folder / name).is_symlink() else seen[real]
            raise UsageError(f"class folders {seen[real]}/ and {name}/ of {folder} are one folder ({link}/ links to "
                             f"{real}): each of its images would be both classes; remove the link")
        seen[real] = name
    if len(names) < at_least:
        loose = sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        more = (f" and {loose} loose image{'s' * (loose != 1)}: move each class's images into a folder named "
                "after the class" if loose else "")
        raise UsageError(f"{folder} must hold one folder per class (at least two), found {len(names)}{more}")
    return names


def _list_images(folder: Path, names: list[str], others: list[Path] | None = None) -> list[tuple[Path, int]]:
    listed = []
    for label, name in enumerate(names):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise UsageError(f"{folder} has no class folder {name!r}, which the train images have; add one holding "
                             "that class's images")
        images = image_files(class_dir, others)
        if not images:
            raise UsageError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove it")
        listed += [(path, label) for path in images]
    return listed
