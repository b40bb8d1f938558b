"""RandAugment on a whole batch of uint8 images, each image drawing its own ops and signs.

The ops, magnitudes and signs are torchvision.transforms.v2.RandAugment's on uint8 tensors (nearest
interpolation, fill 0, magnitude as a bin out of 31), but torchvision draws one op sequence per call,
so a batch would get one policy. Here each image draws its own op and sign in each of the `num_ops`
rounds, and a round is a fixed set of batched tensor ops on the batch's device:

- geometric ops (ShearX/Y, TranslateX/Y, Rotate): one `grid_sample`, each image with the sampling
  grid of its own (op, sign);
- Brightness, Color, Contrast: torchvision's blend with a per-image degenerate image (black, gray,
  gray mean) and a per-image factor 1 ± m;
- Sharpness, Posterize, Solarize, AutoContrast, Equalize: one batched op each.

On the CPU the images of each group are gathered and computed together (reading the group sizes is
free there, and each image is computed once). On a GPU reading the sizes would make the host wait
for the device every batch, so there every group runs on the whole batch and a per-image mask keeps
its result: a fixed set of kernel launches whatever the draw, and no sync; the extra arithmetic is
small next to the training step on such a device. Both ways give the same pixels. The launches do not
grow with the images (on an H100 at 128 images a call, RandAugment(2, 9) ran a trial at 0.56x its
speed), so the training loop hands it several batches at once there
(`cnnopt.training.objective._batches_per_augment`; not yet measured on a GPU that way).

Exactness: the float arithmetic is torchvision's, op for op (its blends round x * r + y * (1 - r)
once, as a fused multiply-add; `addcmul` with per-image factors does the same), and the sampling
grids are built by torchvision's formula one matrix at a time, so every op gives torchvision's pixels
(tests/test_augment.py checks each against torchvision's functional op, with no tolerance).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")  # torchvision's order
GEOMETRIC = OPS[1:6]
BLENDS = ("Brightness", "Color", "Contrast")
SIGNED = GEOMETRIC + BLENDS + ("Sharpness",)  # a random sign flips these, as in torchvision
NUM_BINS = 31  # torchvision's num_magnitude_bins: magnitude is a bin index 0..30
_INDEX = {name: i for i, name in enumerate(OPS)}


def magnitude_of(op: str, magnitude: int, height: int, width: int) -> float:
    """The unsigned strength of `op` at bin `magnitude`, as torchvision computes it (float32 bins).

    Args:
        op: a name in OPS.
        magnitude: bin index in [0, NUM_BINS).
        height, width: the image size (translations are a share of it).
    Returns:
        degrees for Rotate, pixels for translations, bits for Posterize, a share of 255 for Solarize,
        the factor offset for the blends and Sharpness, the shear for shears; 0.0 for ops without one.
    """
    if not 0 <= magnitude < NUM_BINS:
        raise ValueError(f"RandAugment magnitude {magnitude} must be a bin index in [0, {NUM_BINS - 1}]")
    top = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width,
           "TranslateY": 150.0 / 331.0 * height, "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9,
           "Contrast": 0.9, "Sharpness": 0.9}
    if op in top:
        return float(torch.linspace(0.0, top[op], NUM_BINS)[magnitude])
    if op == "Posterize":
        return float((8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 4))).round().int()[magnitude])
    if op == "Solarize":
        return float(torch.linspace(1.0, 0.0, NUM_BINS)[magnitude])
    return 0.0


class RandAugment:
    """torchvision's RandAugment, with ops and signs drawn per image, on the batch's device.

    Args:
        num_ops: ops applied one after another to every image (each image draws its own).
        magnitude: bin index in [0, 30], shared by every op as in torchvision.
        generator: draws the ops and signs; a generator on the batch's device (seeded by the caller, so
            a trial is reproducible).
    """

    def __init__(self, num_ops: int, magnitude: int, *, generator: torch.Generator):
        if num_ops < 0:
            raise ValueError(f"RandAugment num_ops {num_ops} must be >= 0")
        magnitude_of("Identity", magnitude, 1, 1)  # validates the bin
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment uint8 images `(N, C, H, W)` (C = 1 or 3); returns a new uint8 tensor of that shape."""
        n = x.shape[0]
        for _ in range(self.num_ops):
            op = torch.randint(len(OPS), (n,), device=x.device, generator=self.generator)  # (N,)
            negative = torch.rand(n, device=x.device, generator=self.generator) <= 0.5  # torchvision's test
            x = apply_ops(x, op, negative, self.magnitude)
        return x


def apply_ops(x: torch.Tensor, op: torch.Tensor, negative: torch.Tensor, magnitude: int, *,
              grouped: bool | None = None) -> torch.Tensor:
    """One RandAugment round: image i gets op `OPS[op[i]]`, sign-flipped where `negative[i]` (signed ops).

    Args:
        x: uint8 images `(N, C, H, W)`, C = 1 or 3, on any device.
        op: `(N,)` integer indices into OPS, on x's device.
        negative: `(N,)` bool, on x's device; ignored for unsigned ops.
        magnitude: bin index in [0, 30].
        grouped: compute each group of images on its own (True) or every group on the whole batch
            and select by mask (False). The default picks grouped on the CPU, where the group sizes are
            free to read and each image is computed once, and masks elsewhere, where reading the sizes
            would wait for the device. Both give the same pixels.
    Returns:
        uint8 `(N, C, H, W)`; `x` is not modified.
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"RandAugment needs uint8 images (N, 1 or 3, H, W), got {x.dtype} {tuple(x.shape)}")
    _strengths(magnitude, *x.shape[-2:])  # validates the bin before any work
    code = 2 * op + negative.long()  # (N,) the image's (op, sign) pair
    group = _group_table(x.device)[code]  # (N,) index into GROUPS
    if grouped is None:
        grouped = x.device.type == "cpu"
    out = x.clone() if grouped else x
    if grouped:
        counts = torch.bincount(group, minlength=len(GROUPS)).tolist()
        members = torch.split(torch.argsort(group, stable=True), counts)
        for (_, run), index, count in zip(GROUPS, members, counts):
            if count and run is not None:
                out.index_copy_(0, index, run(x.index_select(0, index), code[index], magnitude))
    else:
        for k, (_, run) in enumerate(GROUPS):
            if run is not None:
                out = torch.where((group == k).view(-1, 1, 1, 1), run(x, code, magnitude), out)
    return out


@functools.lru_cache(maxsize=64)
def _strengths(magnitude: int, h: int, w: int) -> dict[str, float]:
    """magnitude_of every op, computed once per size (it builds small tensors)."""
    return {name: magnitude_of(name, magnitude, h, w) for name in OPS}


def _geometric(x: torch.Tensor, code: torch.Tensor, magnitude: int) -> torch.Tensor:
    """Each image through the sampling grid of its own (op, sign), nearest, zero fill: one grid_sample."""
    grids = _grids(magnitude, *x.shape[-2:], x.device)  # (2 * len(OPS), H, W, 2), indexed by code
    sampled = F.grid_sample(x.float(), grids[code], mode="nearest", padding_mode="zeros", align_corners=False)
    return sampled.round_().to(torch.uint8)


@functools.lru_cache(maxsize=16)
def _grids(magnitude: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """Sampling grid of every (op, sign) code, `(2 * len(OPS), H, W, 2)`; identity for non-geometric ops."""
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    matrices = [_inverse_matrix(name, sign * magnitude_of(name, magnitude, h, w), h, w) if name in GEOMETRIC
                else identity for name in OPS for sign in (1.0, -1.0)]
    # One matrix at a time through torchvision's grid formula, so each grid is the one it builds.
    return torch.cat([_affine_grid(torch.tensor(m, device=device).view(1, 2, 3), h, w) for m in matrices])


def _inverse_matrix(name: str, value: float, h: int, w: int) -> list[float]:
    """The output->input affine map torchvision's RandAugment uses for `name` at signed strength `value`."""
    if name in ("ShearX", "ShearY"):
        # torchvision shears about the top-left corner by atan(value) degrees, converted back and forth.
        t = math.tan(math.radians(math.degrees(math.atan(value))))
        cx, cy = -w * 0.5, -h * 0.5  # the corner, relative to the image centre
        if name == "ShearX":
            return [1.0, t, -t * cy, 0.0, 1.0, 0.0]
        return [1.0, 0.0, 0.0, t, 1.0, -t * cx]
    if name in ("TranslateX", "TranslateY"):
        shift = float(int(value))  # whole pixels, truncated toward zero as torchvision does
        return [1.0, 0.0, -shift, 0.0, 1.0, 0.0] if name == "TranslateX" else [1.0, 0.0, 0.0, 0.0, 1.0, -shift]
    # Rotate: torchvision rotates by -value about the centre; the inverse map has these entries.
    angle = math.radians(-value)
    a, b, c, d = math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle)
    return [d, -b, 0.0, -c, a, 0.0]


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torchvision's `_affine_grid` (pixel-centre base grid, then theta, then normalise): `(1, H, W, 2)`."""
    base = torch.empty(1, h, w, 3, device=theta.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=theta.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=theta.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.float().transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], device=theta.device))
    return base.view(1, h * w, 3).bmm(rescaled).view(1, h, w, 2)


def _blends(x: torch.Tensor, code: torch.Tensor, magnitude: int) -> torch.Tensor:
    """Brightness, Color, Contrast at factor 1 ± m: blend with black, the gray image or its mean."""
    factor, rest = _factors(code, _strengths(magnitude, *x.shape[-2:])["Brightness"])  # one range for all three
    xf = x.float()  # (N, C, H, W)
    if x.shape[1] == 3:
        # torchvision's grayscale of uint8 channels (the same kernels, so the same rounding), floored.
        gray = x[:, 0].mul(0.2989).add_(x[:, 1], alpha=0.587).add_(x[:, 2], alpha=0.114).floor_().unsqueeze(1)
    else:
        gray = xf  # (N, 1, H, W)
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)  # (N, 1, 1, 1): exact, a sum of integers
    op = (code // 2).view(-1, 1, 1, 1)
    other = torch.where(op == _INDEX["Brightness"], 0.0, torch.where(op == _INDEX["Color"], gray, mean))
    # torchvision's _blend, x * ratio + other * (1 - ratio), rounds the sum once (a fused multiply-add);
    # addcmul with a per-image factor does the same.
    out = torch.addcmul(xf.mul_(factor), other, rest).clamp_(0, 255).to(torch.uint8)
    if x.shape[1] == 1:  # Color leaves 1-channel images alone
        out = torch.where(op == _INDEX["Color"], x, out)
    return out


def _factors(code: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image `(N, 1, 1, 1)` float32 ratio 1 ± strength and 1 - ratio, each rounded from double as torchvision's."""
    negative = (code % 2 == 1).view(-1, 1, 1, 1)
    ratio = torch.where(negative, 1.0 - strength, 1.0 + strength)
    return ratio, torch.where(negative, 1.0 - (1.0 - strength), 1.0 - (1.0 + strength))


def _sharpness(x: torch.Tensor, code: torch.Tensor, magnitude: int) -> torch.Tensor:
    """Blend the interior with a 3x3 smoothed image by factor 1 ± m; border pixels stay."""
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:  # torchvision leaves images this small alone
        return x
    _, rest = _factors(code, _strengths(magnitude, h, w)["Sharpness"])
    xf = x.float()
    inner = xf[..., 1:-1, 1:-1]  # (N, C, H - 2, W - 2)
    # torchvision smooths with the kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 and rounds. The 3x3 sum is
    # exact in float, and an integer / 13 is never within 1/26 of a rounding tie, so this rounds the same.
    rows = xf[..., :-2] + xf[..., 1:-1] + xf[..., 2:]  # (N, C, H, W - 2)
    total = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :] + 4 * inner
    smooth = total.div_(13).round_()
    out = x.clone()
    # torchvision: inner + (1 - ratio) * (smooth - inner), one fused multiply-add.
    out[..., 1:-1, 1:-1] = torch.addcmul(inner, smooth.sub_(inner), rest).clamp_(0, 255)
    return out


def _posterize(x: torch.Tensor, code: torch.Tensor, magnitude: int) -> torch.Tensor:
    """Keep the top bits of every pixel."""
    bits = int(_strengths(magnitude, *x.shape[-2:])["Posterize"])
    return x if bits >= 8 else x & (((1 << bits) - 1) << (8 - bits))


def _solarize(x: torch.Tensor, code: torch.Tensor, magnitude: int) -> torch.Tensor:
    """Invert every pixel at or above the threshold."""
    threshold = 255.0 * _strengths(magnitude, *x.shape[-2:])["Solarize"]
    # torchvision compares in float32; the same test on integers, as uint8 compares run ~20x faster on the CPU.
    first = math.ceil(torch.tensor(threshold).item())  # the float32 threshold, rounded up to a pixel value
    return x if first > 255 else torch.where(x >= first, x.bitwise_not(), x)


def _autocontrast(x: torch.Tensor, code: torch.Tensor, magnitude: int) -> torch.Tensor:
    """Stretch each channel of each image to [0, 255]; a flat channel stays as it is."""
    xf = x.float()
    low = xf.amin(dim=(-2, -1), keepdim=True)  # (N, C, 1, 1)
    high = xf.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    low = torch.where(flat, 0.0, low)
    return xf.sub_(low).div_(scale).clamp_(0, 255).to(torch.uint8)


def _equalize(x: torch.Tensor, code: torch.Tensor, magnitude: int) -> torch.Tensor:
    """Histogram-equalise each channel of each image with PIL's lookup table (torchvision's algorithm)."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).long()  # (N, C, HW)
    hist = torch.zeros(n, c, 256, dtype=torch.int32, device=x.device)
    hist.scatter_add_(-1, flat, torch.ones_like(flat, dtype=torch.int32))
    cumulative = hist.cumsum(-1)
    # PIL's step: pixels not at the channel's top value, / 255; a channel with step 0 stays as it is.
    top = hist.gather(-1, x.reshape(n, c, h * w).amax(-1, keepdim=True).long())  # (N, C, 1)
    step = (h * w - top) // 255
    # lut[k] = (cumulative[k - 1] + step // 2) // step, lut[0] = 0: cumulative - hist is cumulative[k - 1].
    lut = (cumulative - hist + step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = lut.to(torch.uint8)  # (N, C, 256)
    equalized = lut.gather(-1, flat).view(n, c, h, w)
    return torch.where((step != 0).view(n, c, 1, 1), equalized, x)


# The groups a round computes: (label, function); the function gets the group's images and their
# (op, sign) codes. Identity computes nothing.
GROUPS = (("identity", None), ("geometric", _geometric), ("blend", _blends), ("sharpness", _sharpness),
          ("posterize", _posterize), ("solarize", _solarize), ("autocontrast", _autocontrast),
          ("equalize", _equalize))


@functools.lru_cache(maxsize=8)
def _group_table(device: torch.device) -> torch.Tensor:
    """(op, sign) code `2 * op + negative` -> index into GROUPS: `(2 * len(OPS),)` on `device`."""
    label = {"ShearX": "geometric", "ShearY": "geometric", "TranslateX": "geometric", "TranslateY": "geometric",
             "Rotate": "geometric", "Brightness": "blend", "Color": "blend", "Contrast": "blend"}
    index = {name: k for k, (name, _) in enumerate(GROUPS)}
    return torch.tensor([index[label.get(op, op.lower())] for op in OPS for _ in range(2)], device=device)
