"""Batched augmentation: each one on and off, random per image, normalised like the eval path;
RandAugment op by op against torchvision's."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode, v2

from cnnopt.data.augment import BatchAugment, Normalize
from cnnopt.data.randaugment import OPS, SIGNED, RandAugment, apply_ops, magnitude_of
from cnnopt.experiment.config import TrainConfig

OFF = TrainConfig()  # every augmentation is off by default
AUGMENTATIONS = {
    "flip": {"flip": True},
    "crop": {"crop_padding": 2},
    "crop_constant": {"crop_padding": 2, "crop_padding_mode": "constant"},
    "crop_replicate": {"crop_padding": 2, "crop_padding_mode": "replicate"},
    "affine_degrees": {"affine_degrees": 30.0},
    "affine_translate": {"affine_translate": 0.2},
    "affine_scale": {"affine_scale": 0.3},
    "jitter_brightness": {"jitter_brightness": 0.5},
    "jitter_contrast": {"jitter_contrast": 0.5},
    "jitter_saturation": {"jitter_saturation": 0.5},
    "randaugment": {"randaugment_ops": 2, "randaugment_magnitude": 9},
    "cutout": {"cutout": 4},
}


def identical_batch(n: int = 16, channels: int = 3, side: int = 12) -> torch.Tensor:
    """n copies of one asymmetric image with mid-range pixels, so every augmentation changes it visibly."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(40, 216, (1, channels, side, side), dtype=torch.uint8, generator=generator)
    image[..., : side // 3] = 230  # a bright left band: a flip or shift moves it
    return image.repeat(n, 1, 1, 1)


def pipeline(channels: int = 3, seed: int = 0, device: str = "cpu", **settings) -> BatchAugment:
    normalize = Normalize([0.5] * channels, [0.25] * channels, torch.device(device))
    return BatchAugment(dataclasses.replace(OFF, **settings), normalize, seed=seed)


def distinct(x: torch.Tensor) -> int:
    return len({image.numpy().tobytes() for image in x})


def test_all_off_is_exactly_the_eval_normalisation():
    x = identical_batch()
    augment = pipeline()
    assert augment.active == []
    out = augment(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, augment.normalize(x))
    assert distinct(out) == 1


@pytest.mark.parametrize("name,channels", [(name, channels) for name in AUGMENTATIONS for channels in (1, 3)
                                           if (name, channels) != ("jitter_saturation", 1)])  # grayscale: see below
def test_each_augmentation_is_random_per_image(name, channels):
    x = identical_batch(channels=channels)
    augment = pipeline(channels, **AUGMENTATIONS[name])
    assert augment.active, name
    out = augment(x)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert distinct(out) > 1, f"{name} gave every image of the batch the same parameters"
    assert not torch.equal(out, augment.normalize(x))
    assert torch.equal(x, identical_batch(channels=channels))  # the input is not modified in place


def test_saturation_leaves_grayscale_alone():
    x = identical_batch(channels=1)
    augment = pipeline(1, jitter_saturation=0.5)
    assert torch.allclose(augment(x), augment.normalize(x), atol=1e-6)


def test_flip_is_a_mirror_or_nothing():
    x = identical_batch(n=32)
    augment = pipeline(flip=True)
    out = augment(x)
    plain, mirrored = augment.normalize(x[:1]), augment.normalize(x[:1].flip(-1))
    is_plain = (out == plain).flatten(1).all(1)
    is_mirrored = (out == mirrored).flatten(1).all(1)
    assert (is_plain ^ is_mirrored).all()
    assert 0 < is_mirrored.sum() < 32


def test_crop_is_a_window_of_the_padded_image():
    x = identical_batch(n=32, side=8)
    padding = 2
    augment = pipeline(crop_padding=padding, crop_padding_mode="constant")
    out = augment(x)
    padded = torch.nn.functional.pad(x[:1].float() / 255, (padding,) * 4)
    windows = [padded[..., dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
    windows = [(w - augment.normalize.mean) / augment.normalize.std for w in windows]
    found = set()
    for image in out:
        matches = [i for i, w in enumerate(windows) if torch.allclose(image, w[0])]
        assert matches, "a crop that is not a window of the padded image"
        found.add(matches[0])
    assert len(found) > 5  # offsets drawn per image


def test_affine_zero_fills_and_stays_in_range():
    x = torch.full((8, 1, 10, 10), 255, dtype=torch.uint8)
    augment = pipeline(1, affine_degrees=45.0)
    unnormalised = augment(x) * 0.25 + 0.5
    assert unnormalised.min() >= -1e-5 and unnormalised.max() <= 1 + 1e-5
    assert (unnormalised[:, :, 0, 0] < 0.99).any()  # corners rotated out are filled with zeros


def test_jitter_is_clamped_to_the_pixel_range():
    x = identical_batch()
    augment = pipeline(jitter_brightness=0.9, jitter_contrast=0.9, jitter_saturation=0.9)
    unnormalised = augment(x) * 0.25 + 0.5
    assert unnormalised.min() >= -1e-6 and unnormalised.max() <= 1 + 1e-6


def test_jitter_over_1_never_inverts_an_image():
    """Factors are drawn from [max(0, 1 - s), 1 + s], as torchvision's ColorJitter: a negative contrast or
    saturation factor would turn an image into its negative."""
    from cnnopt.data.augment import color_jitter

    ramp = torch.linspace(0.1, 0.9, 8).view(1, 1, 1, 8).expand(256, 3, 8, 8).clone()
    ramp[:, 0] *= 0.5  # coloured: saturation has something to scale
    generator = torch.Generator().manual_seed(0)
    contrast = color_jitter(ramp, 0, 2.0, 0, generator)
    assert (contrast[..., -1] >= contrast[..., 0]).all(), "the ramp still rises: no inverted contrast"
    saturation = color_jitter(ramp, 0, 0, 2.0, generator)
    gray = (ramp * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)  # its luma
    assert (((saturation - gray) * (ramp - gray)) >= -1e-6).all(), "no channel crosses to the other side of gray"


def test_everything_on_together():
    settings = {key: value for extra in AUGMENTATIONS.values() for key, value in extra.items()}
    augment = pipeline(**settings)
    assert set(augment.active) == {"flip", "crop", "randaugment", "affine", "jitter", "cutout"}
    out = augment(identical_batch())
    assert out.shape == (16, 3, 12, 12) and distinct(out) == 16


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="gpu: needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("size", [1, 4, 5])
def test_cutout_sets_one_square_cut_at_the_border_to_the_mean_colour(size, device):
    """Each image loses one size x size square (fewer pixels where its centre lies near the border), set to
    0 after normalising: the train split's mean colour. Every other pixel is the eval normalisation's. On
    CUDA the squares are drawn on the batch's device (not yet run on a GPU: the next GPU session's check)."""
    x = identical_batch(n=400, side=12).to(device)
    augment = pipeline(cutout=size, device=device)
    out, plain = augment(x), augment.normalize(x)
    assert out.device.type == device
    out, plain = out.cpu(), plain.cpu()
    hole = (out != plain).any(dim=1)  # (N, H, W): where the pipeline changed a pixel
    assert torch.all(out.permute(0, 2, 3, 1)[hole] == 0), "a cut pixel is the mean colour, 0 after normalising"
    for image in hole:
        rows, cols = image.any(dim=1).nonzero().flatten(), image.any(dim=0).nonzero().flatten()
        assert 1 <= len(rows) <= size and 1 <= len(cols) <= size
        assert image.sum() == len(rows) * len(cols), "the hole is one axis-aligned rectangle"
        assert len(rows) == size or rows[0] == 0 or rows[-1] == 11, "a square is cut only at the border"
        assert len(cols) == size or cols[0] == 0 or cols[-1] == 11
    counts = hole.sum(dim=(1, 2))
    assert counts.max() == size * size  # whole squares ...
    assert size == 1 or counts.min() < size * size  # ... and, but for one pixel, border-cut ones
    centres = {(int(r.float().mean()), int(c.float().mean())) for r, c in
               ((h.any(dim=1).nonzero(), h.any(dim=0).nonzero()) for h in hole)}
    assert len(centres) > 50, "each image draws its own place"


def test_same_seed_same_augmentation():
    x = identical_batch()
    settings = {"flip": True, "crop_padding": 2, "affine_degrees": 10.0, "jitter_brightness": 0.3,
                "randaugment_ops": 2, "randaugment_magnitude": 9}
    first, second, other = pipeline(seed=3, **settings), pipeline(seed=3, **settings), pipeline(seed=4, **settings)
    assert torch.equal(first(x), second(x))
    assert torch.equal(first(x), second(x))  # and the next batch too
    assert not torch.equal(pipeline(seed=3, **settings)(x), other(x))


def test_eval_normalisation_uses_the_given_statistics():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).repeat(1, 2, 2, 2)
    normalize = Normalize([0.2, 0.4], [0.5, 0.1], torch.device("cpu"))
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out[:, 0, 0, 0].tolist() == pytest.approx([-0.4, 0.0, 1.6])
    assert out[:, 1, 0, 0].tolist() == pytest.approx([-4.0, -2.0, 6.0])


def test_train_statistics_standardise_the_train_split(digits_data):
    out = Normalize(digits_data.mean, digits_data.std, torch.device("cpu"))(digits_data.train_x)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert out.std().item() == pytest.approx(1.0, abs=1e-3)


# RandAugment. The reference is torchvision's functional op, called as torchvision's RandAugment calls it
# (v2/_auto_augment.py: nearest interpolation, fill None = 0, shears about the top-left corner,
# translations truncated to whole pixels). Tolerance: none. Every op must give torchvision's pixels,
# the geometric ones too: with nearest interpolation and torchvision's own grid formula there is no
# interpolation difference to allow for.


def torchvision_op(image: torch.Tensor, name: str, value: float) -> torch.Tensor:
    """torchvision's `name` at signed strength `value` on one uint8 image `(C, H, W)`."""
    nearest = InterpolationMode.NEAREST
    if name in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(value))
        shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest,
                         fill=None, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(value), 0] if name == "TranslateX" else [0, int(value)]
        return TF.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest,
                         fill=None)
    calls = {"Identity": lambda: image,
             "Rotate": lambda: TF.rotate(image, angle=value, interpolation=nearest, fill=None),
             "Brightness": lambda: TF.adjust_brightness(image, 1.0 + value),
             "Color": lambda: TF.adjust_saturation(image, 1.0 + value),
             "Contrast": lambda: TF.adjust_contrast(image, 1.0 + value),
             "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + value),
             "Posterize": lambda: TF.posterize(image, int(value)),
             "Solarize": lambda: TF.solarize(image, 255.0 * value),
             "AutoContrast": lambda: TF.autocontrast(image),
             "Equalize": lambda: TF.equalize(image)}
    return calls[name]()


def varied_images(channels: int, h: int = 11, w: int = 13, n: int = 8) -> torch.Tensor:
    """uint8 `(n, C, H, W)` (odd, non-square: centre conventions show) covering the cases the ops branch on."""
    generator = torch.Generator().manual_seed(channels)
    x = torch.randint(0, 256, (n, channels, h, w), dtype=torch.uint8, generator=generator)
    x[1] = x[1] // 4 + 100  # low contrast: autocontrast and equalize stretch it
    x[2] = x[2, :1].expand(channels, h, w)  # gray even when RGB
    x[3] = 77  # flat: autocontrast and equalize leave it
    x[4, :, :, : w // 2] = 255  # saturated half: solarize, brightness clamp
    return x


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", OPS)
def test_each_randaugment_op_gives_torchvisions_pixels(name, channels):
    x = varied_images(channels)
    h, w = x.shape[-2:]
    op = torch.full((len(x),), OPS.index(name))
    for magnitude in (0, 9, 30):
        for negative in (False, True):
            value = magnitude_of(name, magnitude, h, w) * (-1 if negative and name in SIGNED else 1)
            expected = torch.stack([torchvision_op(image, name, value) for image in x])
            for grouped in (True, False):
                out = apply_ops(x, op, torch.full((len(x),), negative), magnitude, grouped=grouped)
                assert out.dtype == torch.uint8 and out.shape == x.shape
                assert torch.equal(out, expected), f"{name} magnitude {magnitude} negative {negative} grouped {grouped}"
    assert torch.equal(x, varied_images(channels))  # the input is not modified in place


@pytest.mark.parametrize("channels", [1, 3])
def test_a_mixed_batch_gives_each_image_its_own_op(channels):
    x = varied_images(channels, h=16, w=16, n=8).repeat(8, 1, 1, 1)  # (64, C, 16, 16)
    generator = torch.Generator().manual_seed(1)
    op = torch.randint(len(OPS), (len(x),), generator=generator)
    negative = torch.rand(len(x), generator=generator) <= 0.5
    expected = torch.stack([torchvision_op(image, OPS[k], magnitude_of(OPS[k], 9, 16, 16)
                                           * (-1 if flip and OPS[k] in SIGNED else 1))
                            for image, k, flip in zip(x, op.tolist(), negative.tolist())])
    for grouped in (True, False):
        assert torch.equal(apply_ops(x, op, negative, 9, grouped=grouped), expected)


@pytest.mark.parametrize("height, width, magnitude", [(20, 20, 9), (14, 22, 9), (22, 14, 30), (20, 20, 1)])
def test_randaugment_has_torchvisions_ops_magnitudes_and_signs(height, width, magnitude):
    """One op of torchvision's RandAugment, drawn 400 times, yields exactly the outputs ours yields: the strengths
    are torchvision's own, not a table of ours (on a non-square image a translation's strength is its side's)."""
    image = varied_images(3, h=height, w=width)[1]  # low contrast: AutoContrast and Equalize change it
    image[:, :3, :3] = 200  # and a bright corner for Solarize
    theirs = v2.RandAugment(num_ops=1, magnitude=magnitude)
    torch.manual_seed(0)
    expected = {theirs(image).numpy().tobytes() for _ in range(400)}
    ours = RandAugment(1, magnitude, generator=torch.Generator().manual_seed(0))(image.expand(400, -1, -1, -1))
    assert {out.numpy().tobytes() for out in ours} == expected
    if magnitude == 9:
        assert len(expected) == len(OPS) + len(SIGNED)  # every op, the signed ones with both signs


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_draws_per_image_and_repeats_with_its_seed(channels):
    x = varied_images(channels, h=12, w=12)[:1].expand(64, -1, -1, -1)  # 64 copies of one image
    first = RandAugment(2, 9, generator=torch.Generator().manual_seed(3))
    out = first(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert distinct(out) > 20  # 2 ops each from 14, signs: images differ
    again = RandAugment(2, 9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again(x), out)
    assert torch.equal(again(x), first(x))  # and the next batch too
    assert not torch.equal(RandAugment(2, 9, generator=torch.Generator().manual_seed(4))(x), out)


def test_randaugment_rejects_what_torchvision_would_not_run():
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(2, 31, generator=torch.Generator())
    with pytest.raises(ValueError, match="uint8"):
        RandAugment(1, 9, generator=torch.Generator())(torch.rand(2, 3, 8, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu: needs a CUDA GPU")
def test_randaugment_on_cuda_gives_the_cpus_pixels():
    """Not yet run on a GPU in this project: the first run on one checks it."""
    x = varied_images(3, h=32, w=32).repeat(16, 1, 1, 1)  # (128, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    op = torch.randint(len(OPS), (len(x),), generator=generator)
    negative = torch.rand(len(x), generator=generator) <= 0.5
    expected = apply_ops(x, op, negative, 9)
    out = apply_ops(x.cuda(), op.cuda(), negative.cuda(), 9)  # the masked path
    assert out.device.type == "cuda" and out.dtype == torch.uint8
    # CUDA's kernels may round a blend's multiply-add or a nearest pick at a tie differently from the
    # CPU's (torchvision's own ops do too); allow a few such pixels, never a systematic difference.
    assert (out.cpu() != expected).float().mean() < 1e-3
    pipeline_on_gpu = BatchAugment(dataclasses.replace(OFF, randaugment_ops=2), Normalize([0.5] * 3, [0.25] * 3,
                                   torch.device("cuda")), seed=0)
    assert pipeline_on_gpu(x.cuda()).device.type == "cuda"
