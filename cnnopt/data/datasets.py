"""Datasets decoded once into uint8 tensors, split train/val/test, with train-only statistics.

Every dataset takes the same path as an image file: 8-bit pixels `(N, C, H, W)`, resized and
centre-cropped to `image_size` by the same tensor op the exported Predictor uses, so training and
serving see identical pixels.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnopt.experiment.config import DataConfig, check_section
from cnnopt.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
DATASETS = ("digits", "cifar10", "imagefolder")
IMAGEFOLDER_DEFAULT_SIZE = 64  # photos of any size are brought to this side unless image_size is set


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

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

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
    if cfg.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {cfg.dataset!r}; set data.dataset to one of {', '.join(DATASETS)}")
    check_section("data", cfg)
    if cfg.dataset == "digits":
        x, y, names = _load_digits()
        parts = {"pool": (x, y)}
    elif cfg.dataset == "cifar10":
        parts, names = _load_cifar10(cfg)
    else:
        parts, names = _load_imagefolder(cfg)
    size = cfg.image_size or (IMAGEFOLDER_DEFAULT_SIZE if cfg.dataset == "imagefolder" else 0)
    splits = _split(parts, cfg)
    if size:
        splits = {name: (resize_center_crop(x, size), y) for name, (x, y) in splits.items()}
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits["train"], splits["val"], splits["test"]
    if len(train_x) == 0 or len(val_x) == 0:
        raise UsageError(f"the {cfg.dataset} data left an empty train or val split; add images or change data.val_fraction")
    mean, std = channel_stats(train_x)
    return ImageData(train_x, train_y, val_x, val_y, test_x, test_y, names, mean, std)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (antialiased) and centre-crop to `size` x `size`."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    from torchvision.transforms.v2 import functional as TF  # here, not at import: ~1.5 s of every Ray worker's start

    x = TF.resize(x, [size], antialias=True)
    return TF.center_crop(x, [size, size])


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double() / 255
    std = flat.std(dim=1).clamp_min(1e-3)  # a constant channel must not divide by zero
    return flat.mean(dim=1).tolist(), std.tolist()


def _split(parts: dict, cfg: DataConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Carve the missing splits out of the labelled pool, stratified and seeded."""
    rng = np.random.default_rng(cfg.seed)
    pool_x, pool_y = parts["pool"]
    out = {}
    remaining = np.arange(len(pool_y))
    for name, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if name in parts:
            out[name] = parts[name]
            continue
        take = _stratified_take(pool_y[remaining].numpy(), fraction / (1 - _taken(out, parts, cfg)), rng)
        chosen = remaining[take]
        out[name] = (pool_x[chosen], pool_y[chosen])
        remaining = np.setdiff1d(remaining, chosen)
    if cfg.subset and cfg.subset < len(remaining):
        # After val and test are carved, so every subset size is measured on the same val and test images.
        remaining = remaining[_stratified_take(pool_y[remaining].numpy(), cfg.subset / len(remaining), rng)]
    out["train"] = (pool_x[remaining], pool_y[remaining])
    return out


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


def _load_digits() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 real 8x8 scans with values 0..16, bundled with scikit-learn
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    x = torch.from_numpy(pixels).unsqueeze(1)  # (N, 1, 8, 8)
    return x, torch.from_numpy(digits.target).long(), [str(d) for d in range(10)]


def _load_cifar10(cfg: DataConfig) -> tuple[dict, list[str]]:
    root = Path(cfg.root or "data")
    folder = root if (root / "batches.meta").exists() else root / "cifar-10-batches-py"
    if not (folder / "batches.meta").exists() and cfg.download:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), download=True)
    if not (folder / "batches.meta").exists():
        raise UsageError(f"CIFAR-10 not found in {folder}: set data.root to the folder holding cifar-10-batches-py, "
                         "or set data.download=true to fetch it")
    names = [n.decode() if isinstance(n, bytes) else n for n in _unpickle(folder / "batches.meta")["label_names"]]
    train_files = sorted(folder.glob("data_batch_*"))
    if not train_files or not (folder / "test_batch").exists():
        raise UsageError(f"{folder} lacks data_batch_* or test_batch files; re-extract the CIFAR-10 python archive there")
    train = [_cifar_batch(path) for path in train_files]
    parts = {"pool": (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])),
             "test": _cifar_batch(folder / "test_batch")}
    return parts, names


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            raw = pickle.load(handle, encoding="bytes")
    except Exception as exc:
        raise UsageError(f"cannot read CIFAR-10 file {path}: {exc}") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    x = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return x, torch.tensor(batch["labels"], dtype=torch.long)


def _load_imagefolder(cfg: DataConfig) -> tuple[dict, list[str]]:
    root = Path(cfg.root)
    if not cfg.root or not root.is_dir():
        raise UsageError(f"image folder {cfg.root!r} not found: set data.root to a folder of class folders "
                         "(or of train/, val/, test/ folders of class folders)")
    split_dirs = {"pool": root / "train", "val": root / "val", "test": root / "test"}
    if not (root / "val").is_dir() and (root / "valid").is_dir():
        split_dirs["val"] = root / "valid"
    if not split_dirs["pool"].is_dir():
        split_dirs = {"pool": root}
    split_dirs = {name: path for name, path in split_dirs.items() if path.is_dir()}
    names = _class_names(split_dirs["pool"])
    files = {name: _list_images(path, names) for name, path in split_dirs.items()}
    from PIL import Image

    every = [path for listed in files.values() for path, _ in listed]
    channels = 1 if all(_mode(path, Image) in GRAYSCALE_MODES for path in every) else 3
    size = cfg.image_size or IMAGEFOLDER_DEFAULT_SIZE
    parts = {}
    for name, listed in files.items():
        x = torch.stack([_decode(path, channels, size, Image) for path, _ in listed])
        parts[name] = (x, torch.tensor([label for _, label in listed], dtype=torch.long))
    return parts, names


def _class_names(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise UsageError(f"{folder} must hold one folder per class (at least two), found {len(names)}")
    return names


def _list_images(folder: Path, names: list[str]) -> list[tuple[Path, int]]:
    listed = []
    for label, name in enumerate(names):
        class_dir = folder / name
        images = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if class_dir.is_dir() else []
        if not images:
            raise UsageError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove it")
        listed += [(path, label) for path in images]
    return listed


def _mode(path: Path, Image) -> str:
    try:
        with Image.open(path) as image:
            return image.mode
    except Exception as exc:
        raise UsageError(f"cannot read image {path}: {exc}; remove or replace the file") from None


def _decode(path: Path, channels: int, size: int, Image) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
                image = _flatten_alpha(image.convert("RGBA"), Image)
            if image.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit or float gray: scale to 8 bits, not clip
                image = Image.fromarray(to_uint8(np.asarray(image)))
            image = image.convert("L" if channels == 1 else "RGB")
            array = np.asarray(image, dtype=np.uint8).copy()
    except Exception as exc:
        raise UsageError(f"cannot read image {path}: {exc}; remove or replace the file") from None
    x = torch.from_numpy(array).unsqueeze(0) if channels == 1 else torch.from_numpy(array).permute(2, 0, 1)
    return resize_center_crop(x.unsqueeze(0), size)[0]


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Gray pixels of a wider type (16-bit, 32-bit, float) scaled into 0..255."""
    if array.dtype == np.uint8:
        return array
    top = 255.0 if array.max(initial=0) <= 255 else (65535.0 if array.max() <= 65535 else float(array.max()))
    return np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _flatten_alpha(image, Image):
    """Composite a transparent image on white, as a viewer shows it."""
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image)
