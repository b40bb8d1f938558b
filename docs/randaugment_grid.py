"""Draw a grid of RandAugment outputs: one row per image, its original first, then `--draws` augmentations.

    python docs/randaugment_grid.py --images CIFAR_JPEGS/test --out docs/randaugment_cifar10.png
    python docs/randaugment_grid.py --scale 6 --out docs/randaugment_digits.png

`--images` is a folder of class folders (the first image of the first 8 classes, sorted); without it
the grid shows 8 of scikit-learn's digits (offline). The committed CIFAR-10 grid: CIFAR_JPEGS held
only `test/<class>/0003.jpg` of airplane..horse, extracted from ../shared/device/cifar10-jpeg.tar.xz.
Each draw is one call of cnnopt's batched RandAugment on all rows, so every cell drew its own ops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnopt.cli import Parser
from cnnopt.data.randaugment import RandAugment


def load_rows(folder: Path | None, rows: int) -> torch.Tensor:
    """uint8 `(rows, C, H, W)`: the first image of each of the first `rows` classes, or digits 0..rows-1."""
    if folder is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        picks = [int(np.flatnonzero(digits.target == k)[0]) for k in range(rows)]
        images = digits.images[picks] * (255 / 16)  # 0..16 -> 0..255
        return torch.from_numpy(images.round().astype(np.uint8))[:, None]  # (rows, 1, 8, 8)
    classes = sorted(p for p in folder.iterdir() if p.is_dir())[:rows]
    images = [np.asarray(Image.open(sorted(c.iterdir())[0]).convert("RGB")) for c in classes]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (rows, 3, H, W)


def grid(x: torch.Tensor, draws: int, scale: int, gap: int, seed: int, ops: int, magnitude: int) -> Image.Image:
    """The original column, a wider gap, then `draws` columns of RandAugment(ops, magnitude)."""
    augment = RandAugment(ops, magnitude, generator=torch.Generator().manual_seed(seed))
    columns = [x] + [augment(x) for _ in range(draws)]  # each (rows, C, H, W)
    rows, c, h, w = x.shape
    cell_h, cell_w = h * scale + gap, w * scale + gap
    canvas = np.full((rows * cell_h + gap, (draws + 1) * cell_w + 2 * gap, 3), 255, dtype=np.uint8)
    for j, column in enumerate(columns):
        pixels = column.repeat_interleave(scale, -2).repeat_interleave(scale, -1).expand(-1, 3, -1, -1)
        left = gap + j * cell_w + (2 * gap if j else 0)  # the original stands apart
        for i, image in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
            canvas[gap + i * cell_h:gap + i * cell_h + h * scale, left:left + w * scale] = image
    return Image.fromarray(canvas)


def main() -> None:
    parser = Parser(prog="python docs/randaugment_grid.py", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, help="a folder of class folders; default: scikit-learn's digits")
    parser.add_argument("--out", type=Path, default=Path("docs/randaugment.png"))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--scale", type=int, default=2, help="pixels per image pixel (nearest)")
    parser.add_argument("--ops", type=int, default=2)
    parser.add_argument("--magnitude", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("rows", "draws", "scale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be 1 or more, got {getattr(args, name)}")
    if args.ops < 0 or not 0 <= args.magnitude <= 30:
        parser.error(f"--ops must be 0 or more and --magnitude from 0 to 30, got {args.ops} and {args.magnitude}")
    if args.images is None and args.rows > 10:
        parser.error(f"--rows {args.rows}: the digits have 10 classes, a row each; give 10 or fewer")
    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        parser.error(f"--out {args.out}: name a .png (or .jpg, .webp) file")
    if args.images is not None and not args.images.is_dir():
        parser.error(f"--images {args.images} is not a folder of class folders")
    try:
        x = load_rows(args.images, args.rows)
    except (OSError, ValueError, IndexError) as exc:  # no class folder, an empty one, an unreadable image
        parser.error(f"--images {args.images}: cannot take one image of each class folder ({exc})")
    image = grid(x, args.draws, args.scale, gap=2 * args.scale, seed=args.seed, ops=args.ops,
                 magnitude=args.magnitude)
    try:
        image.save(args.out, optimize=True)
    except OSError as exc:
        parser.error(f"--out {args.out} cannot be written ({exc.strerror or exc})")
    print(f"{args.out}: {image.width}x{image.height}, {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
