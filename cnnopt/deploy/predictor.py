"""The deployable model: the trained CNN wrapped with its eval preprocessing and a softmax.

Input: uint8 images `(N, C, H, W)` of any size with 1 (gray), 3 (RGB) or 4 (RGBA) channels.
Output: class probabilities `(N, num_classes)`. The preprocessing repeats the training data path
exactly: alpha composited on white, grayscale by ITU-R 601 luma (as PIL's convert('L')), shorter
side resized to the training resolution (bilinear, antialiased, rounded to 8 bits), centre crop,
normalisation with the train split's statistics.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Float images with 1, 3 or 4 channels -> `channels` channels, as the training data path converts."""
    if x.shape[1] == 4:  # RGBA: composite on white, to 8 bits (as PIL's alpha_composite)
        alpha = x[:, 3:4] / 255
        x = (x[:, :3] * alpha + 255 * (1 - alpha)).round()
    if channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma in PIL's own fixed point, as its convert('L')
        # exact in float32: the sum stays below 2**24, and dividing by 2**16 only moves the exponent
        x = torch.floor((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536)
    elif channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


class Predictor(nn.Module):
    def __init__(self, model: nn.Module, preprocessing: dict):
        super().__init__()
        self.model = model.eval()
        self.image_size: int = int(preprocessing["image_size"])
        self.channels: int = int(preprocessing["channels"])
        self.class_names: List[str] = [str(name) for name in preprocessing["class_names"]]
        self.register_buffer("mean", torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = match_channels(images.float(), self.channels)  # (N, C, H, W), 0..255
        x = self._resize_center_crop(x)
        x = (x / 255 - self.mean) / self.std
        return torch.softmax(self.model(x), dim=1)

    def _resize_center_crop(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's resize([size]) + center_crop([size, size]) of uint8 images (`decode.resize_center_crop`,
        what the training images went through), by torch's own uint8 kernel, on the CPU whatever the model's
        device: float and round differs by a gray level on 10-25% of pixels, and CUDA has no uint8 antialiased
        resize. Images at the training size (all `model.pt2` takes) are not resized, and stay where they are."""
        size = self.image_size
        height, width = x.shape[-2], x.shape[-1]
        if height != size or width != size:
            if height <= width:
                new_height, new_width = size, int(size * width / height)
            else:
                new_height, new_width = int(size * height / width), size
            if new_height != height or new_width != width:
                x = F.interpolate(x.to(device="cpu", dtype=torch.uint8), size=[new_height, new_width],
                                  mode="bilinear", align_corners=False, antialias=True).to(x.device).float()
            top = int(round((new_height - size) / 2.0))
            left = int(round((new_width - size) / 2.0))
            x = x[:, :, top:top + size, left:left + size]
        return x
