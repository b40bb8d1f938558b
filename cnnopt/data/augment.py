"""Batched augmentation on uint8 image tensors, with random parameters drawn per image.

torchvision's v2 transforms accept a batch but draw one set of parameters per call (every image of
the batch gets the same flip), so flip, crop, affine and colour jitter are written here as tensor
ops over the whole batch with per-image parameters, as airbench does. RandAugment
(`cnnopt.data.randaugment`) is torchvision's, batched the same way: each image draws its own ops.
Every random draw comes from the pipeline's seeded generator, on the batch's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cnnopt.data.randaugment import RandAugment
from cnnopt.experiment.config import TrainConfig

CROP_PADDING_MODES = ("constant", "reflect", "replicate")


class Normalize:
    """uint8 `(N, C, H, W)` -> float, standardised with the train split's statistics."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - self.mean) / self.std


class BatchAugment:
    """The training pipeline: augment uint8 images, then normalise."""

    def __init__(self, config: TrainConfig, normalize: Normalize, seed: int):
        self.config = config
        self.normalize = normalize
        self.generator = torch.Generator(device=normalize.mean.device).manual_seed(seed)
        self.randaugment = None
        if config.randaugment_ops > 0:
            self.randaugment = RandAugment(config.randaugment_ops, config.randaugment_magnitude,
                                           generator=self.generator)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if self.randaugment is not None:
            x = self.randaugment(x)  # (N, C, H, W) uint8, ops drawn per image
        x = x.float() / 255  # (N, C, H, W) in [0, 1]
        if c.flip:
            x = random_flip(x, self.generator)
        if c.crop_padding > 0:
            x = random_crop(x, c.crop_padding, c.crop_padding_mode, self.generator)
        if c.affine_degrees > 0 or c.affine_translate > 0 or c.affine_scale > 0:
            x = random_affine(x, c.affine_degrees, c.affine_translate, c.affine_scale, self.generator)
        if c.jitter_brightness > 0 or c.jitter_contrast > 0 or c.jitter_saturation > 0:
            x = color_jitter(x, c.jitter_brightness, c.jitter_contrast, c.jitter_saturation, self.generator)
        x = (x - self.normalize.mean) / self.normalize.std
        if c.cutout > 0:  # after normalising: 0 is the train split's mean colour
            x = cutout(x, c.cutout, self.generator)
        return x

    @property
    def active(self) -> list[str]:
        """Names of the switched-on augmentations, for logs."""
        c = self.config
        names = {"flip": c.flip, "crop": c.crop_padding > 0, "randaugment": c.randaugment_ops > 0, "cutout": c.cutout > 0,
                 "affine": c.affine_degrees > 0 or c.affine_translate > 0 or c.affine_scale > 0,
                 "jitter": c.jitter_brightness > 0 or c.jitter_contrast > 0 or c.jitter_saturation > 0}
        return [name for name, on in names.items() if on]


def _uniform(n: int, low: float, high: float, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, device=x.device, generator=generator) * (high - low) + low


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2."""
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def random_crop(x: torch.Tensor, padding: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Pad every image by `padding` and cut a window of the original size at a per-image offset."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode=mode)  # (N, C, H + 2p, W + 2p)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a `size` x `size` square of each image, centred at its own random pixel and cut at the border
    (DeVries & Taylor 2017), so a square near the edge covers less: one masked multiply for the batch."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n, 1), device=x.device, generator=generator)
    top, left = cy - size // 2, cx - size // 2  # (N, 1): the square is [top, top + size) x [left, left + size)
    rows = torch.arange(h, device=x.device)[None, :]  # (1, H)
    cols = torch.arange(w, device=x.device)[None, :]
    inside_rows = (rows >= top) & (rows < top + size)  # (N, H)
    inside_cols = (cols >= left) & (cols < left + size)  # (N, W)
    hole = inside_rows[:, :, None] & inside_cols[:, None, :]  # (N, H, W)
    return x * (~hole)[:, None].to(x.dtype)


def random_affine(x: torch.Tensor, degrees: float, translate: float, scale: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Rotate, translate and scale each image by its own random amounts (bilinear, zero fill)."""
    n = x.shape[0]
    angle = _uniform(n, -degrees, degrees, x, generator) * (math.pi / 180)
    zoom = _uniform(n, 1 - scale, 1 + scale, x, generator)
    shift = _uniform(2 * n, -translate, translate, x, generator).view(n, 2) * 2  # grid units span 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Scale brightness, contrast and saturation of each image by factors in [max(0, 1 - s), 1 + s], as
    torchvision's ColorJitter draws them: a factor below 0 would invert contrast or saturation."""
    n = x.shape[0]
    if brightness > 0:
        x = x * _uniform(n, max(0.0, 1 - brightness), 1 + brightness, x, generator).view(-1, 1, 1, 1)
    if contrast > 0:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        factor = _uniform(n, max(0.0, 1 - contrast), 1 + contrast, x, generator).view(-1, 1, 1, 1)
        x = (x - mean) * factor + mean
    if saturation > 0 and x.shape[1] == 3:
        gray = _gray(x)
        factor = _uniform(n, max(0.0, 1 - saturation), 1 + saturation, x, generator).view(-1, 1, 1, 1)
        x = (x - gray) * factor + gray
    return x.clamp(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)
