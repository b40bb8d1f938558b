"""Batched augmentation: each one on and off, random per image, normalised like the eval path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cnnopt.data.augment import BatchAugment, Normalize
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
}


def identical_batch(n: int = 16, channels: int = 3, side: int = 12) -> torch.Tensor:
    """n copies of one asymmetric image with mid-range pixels, so every augmentation changes it visibly."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(40, 216, (1, channels, side, side), dtype=torch.uint8, generator=generator)
    image[..., : side // 3] = 230  # a bright left band: a flip or shift moves it
    return image.repeat(n, 1, 1, 1)


def pipeline(channels: int = 3, seed: int = 0, **settings) -> BatchAugment:
    normalize = Normalize([0.5] * channels, [0.25] * channels, torch.device("cpu"))
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
    torch.manual_seed(0)  # RandAugment draws from the global generator
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


def test_everything_on_together():
    torch.manual_seed(0)
    settings = {key: value for extra in AUGMENTATIONS.values() for key, value in extra.items()}
    augment = pipeline(**settings)
    assert set(augment.active) == {"flip", "crop", "randaugment", "affine", "jitter"}
    out = augment(identical_batch())
    assert out.shape == (16, 3, 12, 12) and distinct(out) == 16


def test_same_seed_same_augmentation():
    x = identical_batch()
    settings = {"flip": True, "crop_padding": 2, "affine_degrees": 10.0, "jitter_brightness": 0.3}
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
