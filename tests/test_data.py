"""Datasets: digits, a CIFAR-10 batch folder and image folders, written here in their real formats."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnopt.experiment.config import DataConfig
from cnnopt.data.datasets import channel_stats, load_data
from cnnopt.data.decode import resize_center_crop
from cnnopt.errors import UsageError

@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    """Each test caches decoded image folders in its own folder, never in the user's."""
    monkeypatch.setenv("CNNOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def rows(x: torch.Tensor) -> Counter:
    """Each image's bytes, counted: equal Counters mean the same images, duplicates included."""
    return Counter(image.numpy().tobytes() for image in x)


# ----- digits -----


def test_digits_shape_dtype_and_classes(digits_data):
    data = digits_data
    for x, y in ((data.train_x, data.train_y), (data.val_x, data.val_y), (data.test_x, data.test_y)):
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64 and len(y) == len(x)
    assert data.num_classes == 10 and data.class_names == [str(d) for d in range(10)]
    assert data.channels == 1 and data.image_size == 8
    assert int(data.train_x.max()) == 255 and int(data.train_x.min()) == 0  # 0..16 scaled to the full byte range
    assert set(data.train_y.tolist()) == set(range(10))


def test_digits_split_sizes_are_stratified(digits_data):
    data = digits_data
    total = len(data.train_y) + len(data.val_y) + len(data.test_y)
    assert total == 1797
    pool = torch.cat([data.train_y, data.val_y, data.test_y]).bincount(minlength=10)
    for y, fraction in ((data.test_y, 0.15), (data.val_y, 0.15), (data.train_y, 0.70)):
        assert abs(len(y) - fraction * total) <= 10
        per_class = y.bincount(minlength=10)
        assert ((per_class - fraction * pool).abs() <= 1.5).all(), per_class  # every class in proportion


def test_digits_splits_partition_the_dataset(digits_data):
    from sklearn.datasets import load_digits

    original = torch.from_numpy(np.round(load_digits().images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    data = digits_data
    # The three splits together hold every image exactly as often as the dataset does: none shared, none lost.
    assert rows(data.train_x) + rows(data.val_x) + rows(data.test_x) == rows(original)
    # And no val or test image appears in train (the few exact duplicate scans of the dataset aside).
    duplicated = {key for key, count in rows(original).items() if count > 1}
    train_keys = set(rows(data.train_x)) - duplicated
    assert not train_keys & set(rows(data.val_x)) and not train_keys & set(rows(data.test_x))


def test_split_is_determined_by_the_seed(digits_data):
    same = load_data(DataConfig(seed=0))
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(same, name), getattr(digits_data, name))
    other = load_data(DataConfig(seed=1))
    assert len(other.val_y) == len(digits_data.val_y)
    assert rows(other.val_x) != rows(digits_data.val_x)
    assert rows(other.test_x) != rows(digits_data.test_x)


def test_mean_std_are_of_the_train_split_only(digits_data):
    data = digits_data
    pixels = data.train_x.double() / 255
    assert data.mean == pytest.approx([pixels.mean().item()], rel=1e-9)
    assert data.std == pytest.approx([pixels.std().item()], rel=1e-9)
    everything = torch.cat([data.train_x, data.val_x, data.test_x]).double() / 255
    assert data.mean[0] != everything.mean().item()


def test_digits_image_size_resizes_every_split():
    data = load_data(DataConfig(image_size=16))
    assert data.train_x.shape[1:] == data.val_x.shape[1:] == data.test_x.shape[1:] == (1, 16, 16)
    assert data.train_x.dtype == torch.uint8 and data.preprocessing()["image_size"] == 16


def test_subset_keeps_a_stratified_sample_of_training_images(digits_data):
    data = load_data(DataConfig(subset=200))
    assert len(data.train_y) == 200, "exactly the images asked for, as data.subset is recorded"
    assert (data.train_y.bincount(minlength=10) >= 19).all()
    assert [len(load_data(DataConfig(subset=n)).train_y) for n in (10, 17, 1001)] == [10, 17, 1001]
    with pytest.raises(UsageError, match="data.subset = 5 keeps fewer training images than the 10 classes"):
        load_data(DataConfig(subset=5))
    assert len(load_data(DataConfig(subset=len(digits_data.train_y))).train_y) == len(digits_data.train_y)
    with pytest.raises(UsageError, match=f"data.subset = 100000 is more than the {len(digits_data.train_y)} training"):
        load_data(DataConfig(subset=100000))  # it was every image, silently
    # An imbalanced split: the small classes keep an image each, where their share would round to none.
    from cnnopt.data.datasets import _stratified_count

    labels = np.array([0] * 1000 + [1] * 10 + [2] * 10)
    for count, expected in ((3, [1, 1, 1]), (20, [18, 1, 1]), (200, [196, 2, 2])):
        chosen = _stratified_count(labels, count, np.random.default_rng(0))
        assert np.bincount(labels[chosen]).tolist() == expected
    assert rows(data.train_x) <= rows(digits_data.train_x)  # a sample of the same train split
    # val and test are the ones without a subset, so studies at different subset sizes compare fairly
    assert torch.equal(data.val_x, digits_data.val_x) and torch.equal(data.test_x, digits_data.test_x)
    pixels = data.train_x.double() / 255
    assert data.mean == pytest.approx([pixels.mean().item()])


def test_unknown_dataset_is_rejected():
    with pytest.raises(UsageError, match="unknown dataset 'mnist'.*digits, cifar10, imagefolder"):
        load_data(DataConfig(dataset="mnist"))


@pytest.mark.parametrize("val,test", [(0.5, 0.5), (1.0, 0.0), (-0.1, 0.1)])
def test_bad_fractions_are_rejected(val, test):
    with pytest.raises(UsageError, match="val_fraction"):
        load_data(DataConfig(val_fraction=val, test_fraction=test))


def test_why_no_test_names_a_zero_fraction_and_one_that_rounds_every_class_to_nothing(digits_data):
    """A small share of a small dataset rounds each class's test images to 0: the fraction is above 0, so
    "set data.test_fraction above 0" (what promotion said) did not say what to change."""
    from cnnopt.data.datasets import why_no_test

    assert why_no_test(DataConfig(), digits_data) is None
    cfg = DataConfig(test_fraction=0.001)
    data = load_data(cfg)
    assert len(data.test_y) == 0 and len(data.train_y) + len(data.val_y) == 1797
    assert why_no_test(cfg, data) == ("data.test_fraction = 0.001 leaves no test image (1797 images: each class's "
                                      "share rounds to 0)", "raise data.test_fraction, or add images")
    cfg = DataConfig(test_fraction=0)
    assert why_no_test(cfg, load_data(cfg)) == ("data.test_fraction = 0 leaves no test split",
                                                "set data.test_fraction above 0 (the default is 0.15)")


def test_channel_stats_match_the_double_precision_definition_across_chunks():
    x = torch.randint(0, 256, (700, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flat = x.transpose(0, 1).reshape(3, -1).double() / 255
    mean, std = channel_stats(x, chunk_bytes=256 * 75)  # 700 rows of 75 bytes: three chunks, the last one short
    assert mean == pytest.approx(flat.mean(dim=1).tolist(), abs=1e-12)
    assert std == pytest.approx(flat.std(dim=1).tolist(), abs=1e-12)


def test_channel_stats_clamps_a_constant_channel():
    mean, std = channel_stats(torch.full((2, 3, 4, 4), 51, dtype=torch.uint8))
    assert mean == pytest.approx([0.2] * 3) and min(std) > 0


def test_resize_center_crop_makes_a_square():
    x = torch.zeros(2, 3, 10, 20, dtype=torch.uint8)
    x[..., 5:15] = 255  # the centre square of the wide image
    out = resize_center_crop(x, 6)
    assert out.shape == (2, 3, 6, 6) and out.dtype == torch.uint8
    assert (out[..., 1:5] == 255).all() and out.float().mean() > 200  # antialiasing softens only the edge columns


# ----- CIFAR-10, written in the real python-pickle format -----


def write_cifar(root: Path, batches: int = 2, per_batch: int = 30, test: int = 20, learnable: bool = False) -> Path:
    """A cifar-10-batches-py folder; pixel 0 of each image holds a marker (1 train, 2 test), pixels 1-2 its id.
    Its pixels are random, or where `learnable`, each class's own colour under a little noise (a net learns
    it in a few steps, whatever the crop or mirror)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = np.random.default_rng(1).integers(0, 256, (10, 3))  # apart: the random pixels stay the same

    def batch(count: int, marker: int, first_id: int, label: bytes) -> dict:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        if learnable:  # rows are the CIFAR layout: 1024 red, 1024 green, then 1024 blue values
            noise = rng.integers(-24, 25, (count, 3, 1024))
            classes = np.arange(count) % 10
            data = np.clip(colours[classes][:, :, None] + noise, 0, 255).astype(np.uint8).reshape(count, 3072)
        ids = np.arange(first_id, first_id + count)
        data[:, 0], data[:, 1], data[:, 2] = marker, ids // 256, ids % 256
        labels = [int(i % 10) for i in range(count)]
        return {b"batch_label": label, b"labels": labels, b"data": data,
                b"filenames": [f"image_{i}.png".encode() for i in ids]}

    for index in range(1, batches + 1):
        with open(folder / f"data_batch_{index}", "wb") as handle:
            pickle.dump(batch(per_batch, 1, index * 1000, b"training batch"), handle, protocol=2)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump(batch(test, 2, 0, b"testing batch 1 of 1"), handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR_NAMES],
                     b"num_vis": 3072}, handle, protocol=2)
    return folder


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_batches_load_with_the_official_test_split(tmp_path, point_at):
    folder = write_cifar(tmp_path)
    root = tmp_path if point_at == "parent" else folder
    data = load_data(DataConfig(dataset="cifar10", root=str(root), val_fraction=0.2, test_fraction=0.4))
    assert data.class_names == CIFAR_NAMES
    assert data.channels == 3 and data.image_size == 32 and data.train_x.dtype == torch.uint8
    # The official test batch is the test split, whole and in order; test_fraction does not apply.
    with open(folder / "test_batch", "rb") as handle:
        official = pickle.load(handle, encoding="bytes")
    assert torch.equal(data.test_x, torch.from_numpy(official[b"data"].reshape(-1, 3, 32, 32)))
    assert data.test_y.tolist() == official[b"labels"]
    # val is carved from the 60 training images, stratified: 6 per class, 20% of each -> 1.
    assert len(data.val_y) == 10 and sorted(data.val_y.tolist()) == list(range(10))
    assert len(data.train_y) == 50
    assert (data.train_x[:, 0, 0, 0] == 1).all() and (data.val_x[:, 0, 0, 0] == 1).all()
    ids = [tuple(image[0, 0, 1:3].tolist()) for image in torch.cat([data.train_x, data.val_x])]
    assert len(set(ids)) == 60  # disjoint and complete
    # A label stays with its image: image id i was written with label i % 10.
    for image, label in zip(data.train_x, data.train_y):
        assert (int(image[0, 0, 1]) * 256 + int(image[0, 0, 2])) % 10 == int(label)
    pixels = data.train_x.transpose(0, 1).reshape(3, -1).double() / 255
    assert data.mean == pytest.approx(pixels.mean(dim=1).tolist())


def test_cifar10_missing_folder_names_it(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(UsageError) as caught:
        load_data(DataConfig(dataset="cifar10", root=str(root)))
    message = str(caught.value)
    assert str(root / "cifar-10-batches-py") in message and "data.root" in message


def test_a_cifar10_download_that_fails_is_one_line(tmp_path, monkeypatch):
    """A download that cannot reach its server (here no socket may connect and no name resolve: the test is
    offline whatever torchvision tries first), or cannot land where it is asked (under a plain file), is one
    line saying how to fetch the archive by hand. data.download=True is the setting under test."""
    def offline(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket, "getaddrinfo", offline)  # not even a DNS lookup of the download's host
    (tmp_path / "a_file").write_text("a plain file: no folder can be made under it")
    for root in (tmp_path / "cifar", tmp_path / "a_file" / "cifar"):
        with pytest.raises(UsageError, match="downloading CIFAR-10 into .* failed .*by hand.*data.download=false"):
            load_data(DataConfig(dataset="cifar10", root=str(root), download=True))


def test_cifar10_without_batches_is_rejected(tmp_path):
    folder = write_cifar(tmp_path)
    for path in folder.glob("data_batch_*"):
        path.unlink()
    with pytest.raises(UsageError, match="data_batch_"):
        load_data(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_a_part_extracted_cifar10_is_one_warning_and_stray_copies_are_not_batches(tmp_path, capsys):
    """Two of the five train batches trained silently on 20,000 images; a data_batch_1.bak (a copy kept by
    hand) was read as a sixth batch, every image twice."""
    folder = write_cifar(tmp_path, batches=2, per_batch=30)
    (folder / "data_batch_1.bak").write_bytes((folder / "data_batch_1").read_bytes())
    for _ in range(2):  # a study loads its data several times: one line
        data = load_data(DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.2))
    assert len(data.train_y) + len(data.val_y) == 60
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1, err
    assert f"{folder} holds data_batch_1, data_batch_2 of CIFAR-10's five train batches" in err
    for index in range(3, 6):
        (folder / f"data_batch_{index}").write_bytes((folder / "data_batch_1").read_bytes())
    load_data(DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.2, duplicates="warn"))
    assert "five train batches" not in capsys.readouterr().err


def test_cifar10_corrupt_batch_names_the_file(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match="data_batch_2"):
        load_data(DataConfig(dataset="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize("batch, fragment", [({b"data": np.zeros((10, 1000), np.uint8), b"labels": [0] * 10},
                                              r"data \(10, 1000\)"),
                                             ({b"data": np.zeros((10, 3072), np.uint8)}, "KeyError 'labels'")])
def test_a_cifar10_batch_of_another_shape_or_without_its_keys_names_the_file(tmp_path, batch, fragment):
    """It unpickled, then reshape (or a missing key) raised: a traceback."""
    folder = write_cifar(tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(UsageError, match=rf"cannot read CIFAR-10 file .*data_batch_2: no CIFAR-10 batch: .*{fragment}"):
        load_data(DataConfig(dataset="cifar10", root=str(tmp_path)))


# ----- image folders, written with PIL -----


def save(path: Path, mode: str, size: tuple[int, int], value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = Image.new("RGB", size, (value, 0, 255 - value)).convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "RGBA":
        image = Image.new("RGBA", size, (value, value, value, 0))  # fully transparent
    elif mode == "L":
        image = Image.new("L", size, value)
    else:
        image = Image.new(mode, size, (value,) * len(mode))
    image.save(path)


def write_flat_folder(root: Path, modes=("L", "RGB", "RGBA", "P"), per_class: int = 6) -> Path:
    sizes = [(12, 12), (20, 14), (9, 17), (40, 40)]
    for name in ("cat", "dog"):
        for index in range(per_class):
            save(root / name / f"{index}.png", modes[index % len(modes)], sizes[index % len(sizes)], 40 * index)
    return root


def test_a_file_name_that_is_no_utf8_loads_and_a_class_folder_so_named_is_one_line(tmp_path):
    """A Latin-1 name (an old zip's) broke every load: the cache key encoded it as UTF-8 (a traceback). A file so
    named is an image like any; a class folder so named is refused (TorchScript cannot hold it as a class name)."""
    import os

    for name in ("a", "b"):
        for i in range(6):
            save(tmp_path / "f" / name / f"{i}.png", "L", (8, 8), value=40 * i)
    save(Path(os.fsdecode(bytes(tmp_path / "f" / "a") + b"/caf\xe9.png")), "L", (8, 8))
    for cache in (True, False):
        data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "f"), image_size=8, cache=cache,
                                    cache_dir=str(tmp_path / "cache")))
        assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 13
    for i in range(6):
        save(Path(os.fsdecode(bytes(tmp_path / "f") + b"/\xe9l\xe9phant/") + f"{i}.png"), "L", (8, 8))
    with pytest.raises(UsageError, match=r"class folder b'.*/f/\\xe9l\\xe9phant' is not named in UTF-8.*rename it"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "f"), image_size=8, cache=False))


@pytest.mark.parametrize("splits", [("Train", "Test"), ("training", "validation"), ("val", "test")])
def test_split_folders_not_named_train_val_test_are_refused_not_read_as_classes(tmp_path, splits):
    """Train/ and Test/ (or val/ and test/ without train/) were read as two classes: it trained "Train vs Test"."""
    for split in splits:
        for name in ("cat", "dog"):
            for i in range(3):
                save(tmp_path / split / name / f"{i}.png", "L", (8, 8), value=40 * i)
    with pytest.raises(UsageError, match=rf"holds {sorted(splits)[0]}/, {sorted(splits)[1]}/: split folders, read as "
                                         r"classes here; name them train/, val/ \(or valid/\) and test/, in lower case"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, cache=False))
    # Beside a lower-case train/, they were left out without a word (20 images read as 20 of 36).
    for split in ("train", "validation", "Test"):
        for name in ("cat", "dog"):
            for i in range(3):
                save(tmp_path / "beside" / split / name / f"{i}.png", "L", (8, 8), value=40 * i)
    with pytest.raises(UsageError, match=r"holds Test/, validation/ beside train/, which are not read: name split "):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "beside"), image_size=8, cache=False))
    for name in ("cat", "dog"):  # val/ and valid/ both: valid/ was left out
        for split in ("val", "valid"):
            save(tmp_path / "both" / split / name / "0.png", "L", (8, 8))
        for i in range(3):
            save(tmp_path / "both" / "train" / name / f"{i}.png", "L", (8, 8), value=40 * i)
    with pytest.raises(UsageError, match=r"holds valid/ beside train/, which are not read"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "both"), image_size=8, cache=False))


def test_a_linked_folder_inside_a_class_is_followed_once_and_a_loop_ends(tmp_path):
    """Path.rglob does not follow a link to a folder: dog/linked -> extra/ lost its 5 images without a word
    (while a linked class folder was read)."""
    from cnnopt.data.decode import image_files

    for i in range(5):
        save(tmp_path / "extra" / f"{i}.png", "L", (8, 8))
    for name in ("cat", "dog"):
        for i in range(3):
            save(tmp_path / "f" / name / f"{i}.png", "L", (8, 8))
    (tmp_path / "f" / "dog" / "linked").symlink_to(tmp_path / "extra", target_is_directory=True)
    (tmp_path / "f" / "dog" / "again").symlink_to(tmp_path / "extra", target_is_directory=True)  # once, not twice
    (tmp_path / "f" / "cat" / "loop").symlink_to(tmp_path / "f", target_is_directory=True)  # up: the root
    (tmp_path / "f" / "cat" / "self").symlink_to(tmp_path / "f" / "cat", target_is_directory=True)  # itself
    (tmp_path / "f" / "cat" / "root").symlink_to("/", target_is_directory=True)  # the whole machine
    dog = image_files(tmp_path / "f" / "dog")
    assert len(dog) == 8 and sum(path.parent.name in ("linked", "again") for path in dog) == 5, dog
    cat = image_files(tmp_path / "f" / "cat")  # the dog images under loop/dog were read as cats
    assert [path.name for path in cat] == ["0.png", "1.png", "2.png"], cat


def test_hidden_files_and_folders_in_class_folders_are_not_images(tmp_path):
    """A notebook's checkpoints folder, macOS's AppleDouble copies and a folder named like an image are
    skipped, at any depth, by training and predict alike (they would be mislabelled or unreadable)."""
    from cnnopt.predict import image_paths

    root = write_flat_folder(tmp_path / "pets", modes=("L",), per_class=4)
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    shutil.copy(root / "dog" / "0.png", root / "cat" / ".ipynb_checkpoints" / "0.png")  # a dog, in cat/
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (root / "dog" / "album.png").mkdir()
    data = load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=8, val_fraction=0.25,
                                test_fraction=0.25))
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 8
    assert [path.name for path in image_paths([str(root / "cat")])] == ["0.png", "1.png", "2.png", "3.png"]
    # Named twice, itself and through its folder: predicted once, in the order first named.
    assert [path.name for path in image_paths([str(root / "cat" / "2.png"), str(root / "cat")])] == \
        ["2.png", "0.png", "1.png", "3.png"]


def test_a_float_image_within_0_and_1_is_scaled_by_1_not_read_as_black(tmp_path):
    from cnnopt.data.decode import decode_image

    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, "F").save(tmp_path / "ramp.tif")
    decoded = decode_image(tmp_path / "ramp.tif", 1, 8)[0]
    assert decoded.min() == 0 and decoded.max() == 255
    assert np.array_equal(decoded, np.round(ramp * 255).astype(np.uint8))


def test_flat_image_folder_mixed_sizes_and_modes(tmp_path):
    root = write_flat_folder(tmp_path / "pets", per_class=8)
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    data = load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=10, val_fraction=0.25,
                                test_fraction=0.25))
    assert data.class_names == ["cat", "dog"]
    assert data.channels == 3  # one RGB image makes the set RGB
    for x in (data.train_x, data.val_x, data.test_x):
        assert x.shape[1:] == (3, 10, 10) and x.dtype == torch.uint8
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 16
    assert data.val_y.bincount().tolist() == [2, 2] and data.test_y.bincount().tolist() == [2, 2]
    every = torch.cat([data.train_x, data.val_x, data.test_x])
    assert (every == 255).all(dim=(1, 2, 3)).sum() == 4  # the transparent RGBA images, flattened on white


def test_image_folder_default_size_is_64(tmp_path):
    root = write_flat_folder(tmp_path / "pets")
    data = load_data(DataConfig(dataset="imagefolder", root=str(root)))
    assert data.train_x.shape[1:] == (3, 64, 64)


def test_grayscale_image_folder_has_one_channel(tmp_path):
    root = write_flat_folder(tmp_path / "pets", modes=("L",))
    data = load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=8))
    assert data.channels == 1 and data.train_x.shape[1:] == (1, 8, 8)


def write_presplit(root: Path, val_name: str = "val", with_test: bool = True) -> dict[str, int]:
    """train/, val/ (or valid/), test/ of two classes; each split has its own pixel value."""
    values = {"train": 20, val_name: 150}
    if with_test:
        values["test"] = 250
    counts = {"train": 6, val_name: 3, "test": 2}
    for split, value in values.items():
        for name in ("a", "b"):
            for index in range(counts[split]):
                save(root / split / name / f"{index}.png", "L", (6 + index, 8), value)
    return values


@pytest.mark.parametrize("val_name", ["val", "valid"])
def test_presplit_image_folder_keeps_its_splits(tmp_path, val_name):
    values = write_presplit(tmp_path / "set", val_name)
    data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "set"), image_size=4))
    assert data.class_names == ["a", "b"]
    assert len(data.train_y) == 12 and len(data.val_y) == 6 and len(data.test_y) == 4
    assert (data.train_x == values["train"]).all()
    assert (data.val_x == values[val_name]).all()
    assert (data.test_x == values["test"]).all()
    assert data.mean == pytest.approx([20 / 255])  # train pixels only; val and test are much brighter


def test_presplit_without_test_carves_test_from_train(tmp_path):
    write_presplit(tmp_path / "set", with_test=False)
    data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "set"), image_size=4, test_fraction=0.34))
    assert len(data.val_y) == 6 and (data.val_x == 150).all()
    assert len(data.test_y) == 4 and (data.test_x == 20).all() and len(data.train_y) == 8


def test_a_class_only_test_has_or_only_train_has_is_named(tmp_path):
    """A class folder only test/ holds would drop its images from the test score without a word."""
    write_presplit(tmp_path / "set")
    save(tmp_path / "set" / "test" / "c" / "0.png", "L", (8, 8), 250)
    with pytest.raises(UsageError, match=r"test holds class folder c that .*train does not: a model trained there "
                                         r"cannot predict it; add it to train/ or remove it"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "set"), image_size=4))
    write_presplit(tmp_path / "other")
    for image in (tmp_path / "other" / "val" / "b").iterdir():
        image.unlink()
    (tmp_path / "other" / "val" / "b").rmdir()
    with pytest.raises(UsageError, match=r"val has no class folder 'b', which the train images have"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "other"), image_size=4))


def test_corrupt_image_is_reported_with_its_path(tmp_path):
    root = write_flat_folder(tmp_path / "pets")
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(UsageError) as caught:
        load_data(DataConfig(dataset="imagefolder", root=str(root)))
    assert str(bad) in str(caught.value) and "cannot read image" in str(caught.value)


def test_truncated_image_is_reported_with_its_path(tmp_path):
    root = write_flat_folder(tmp_path / "pets")
    source = root / "cat" / "3.png"
    truncated = root / "cat" / "truncated.png"
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noisy.save(source)
    truncated.write_bytes(source.read_bytes()[:2000])
    with pytest.raises(UsageError) as caught:
        load_data(DataConfig(dataset="imagefolder", root=str(root)))
    assert str(truncated) in str(caught.value)


def test_files_of_types_not_read_are_one_warning_and_a_file_managers_are_not(tmp_path, capsys):
    """A .jfif or .heic photo, or one with no extension, was left out without a word (QA: 101 of a class's 105
    files read); Thumbs.db, desktop.ini and hidden files are no photos and are not counted."""
    root = write_flat_folder(tmp_path / "pets", per_class=6)
    for name in ("cat/holiday.jfif", "cat/phone.HEIC", "dog/scan", "dog/Thumbs.db", "dog/desktop.ini", "cat/.DS_Store"):
        (root / name).write_bytes(b"x")
    load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=8, cache=False))
    err = capsys.readouterr().err
    assert f"warning: 3 files under {root} are not read, not being of an image type cnnopt reads (" in err, err
    assert all(kind in err for kind in ("1 .jfif", "1 .heic", "1 no extension")) and "Thumbs" not in err
    from cnnopt.predict import image_paths  # predict on the folder says so too

    assert len(image_paths([str(root / "cat")])) == 6
    assert "warning: 2 files in the folders given are not read" in capsys.readouterr().err


def test_a_class_too_small_for_a_share_of_val_and_test_is_one_warning(tmp_path, capsys):
    """A class of one image went to train alone: the scores never measured it, and nothing said so."""
    root = write_flat_folder(tmp_path / "pets", per_class=12)
    save(root / "hamster" / "0.png", "RGB", (16, 16), 77)
    data = load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=8, cache=False))
    assert 2 not in data.val_y.tolist() + data.test_y.tolist()
    err = capsys.readouterr().err
    assert ("warning: 1 class is missing from a split: 'hamster' (1 image, none in val or test); a class with none in "
            "train is never learned, one with none in val or test never scored (a split carved from the images takes "
            "a rounded share of each class); add images to them (or remove them)") in err
    load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=8, cache=False, val_fraction=0.5,
                         test_fraction=0.25, duplicates="warn"))  # its one image rounds into val: never learned
    assert "'hamster' (1 image, none in train or test)" in capsys.readouterr().err
    write_flat_folder(tmp_path / "even", per_class=12)
    load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "even"), image_size=8, cache=False))
    assert "never scored" not in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
def test_every_unreadable_image_of_a_folder_is_named_in_one_line(tmp_path, workers, caplog, monkeypatch, capsys):
    """A real folder with several bad files said one a run, and each run decoded the folder again up to the
    next (a QA folder of 20,000 photos: 34 s a run, one truncated JPEG each). Files whose header does not read
    are all named by the header pass, those that break mid-decode all by the decode pass."""
    root = write_flat_folder(tmp_path / "pets", per_class=40)  # 80 files: the passes go in several chunks
    headless = [root / "cat" / "empty.png", root / "dog" / "notes.jpg", root / "dog" / "zz.png"]
    headless[0].write_bytes(b"")
    headless[1].write_text("not a photo")
    headless[2].write_bytes(b"\x89PNG broken")
    config = DataConfig(dataset="imagefolder", root=str(root), decode_workers=workers, cache=False)
    with pytest.raises(UsageError) as caught:
        load_data(config)
    message = str(caught.value)
    assert message.startswith("3 images cannot be read (") and message.endswith("; remove or replace them"), message
    assert all(str(path) in message for path in headless) and "\n" not in message
    for path in headless:
        path.unlink()
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    cut = [root / "cat" / f"cut{i}.png" for i in range(7)]
    for path in cut:
        noisy.save(path)
        path.write_bytes(path.read_bytes()[:2000])
    from cnnopt import cli

    previous = cli.logging_to()
    try:
        monkeypatch.setenv("CNNOPT_LOG", str(tmp_path / "cnnopt.log"))
        cli.quiet_libraries()
        with pytest.raises(UsageError) as caught, caplog.at_level("ERROR"):
            load_data(config)
        message = str(caught.value)
        assert message.startswith("7 images cannot be read (") and \
            f"; and 2 more, every one listed in {tmp_path / 'cnnopt.log'}); remove" in message, message
        assert sum(str(path) in message for path in cut) == 5
        assert all(str(path) in caplog.text for path in cut), "the whole list where the line points"
        # A log file that cannot be written: no promise of it, and no line per file on the console either.
        monkeypatch.setenv("CNNOPT_LOG", str(tmp_path / "no-such-folder" / "cnnopt.log"))
        cli.quiet_libraries()
        with pytest.raises(UsageError) as caught:
            load_data(config)
        assert "; and 2 more); remove or replace them" in str(caught.value)
        assert "cannot read image" not in capsys.readouterr().err
    finally:
        monkeypatch.setenv("CNNOPT_LOG", str(previous or tmp_path / "no-such-folder" / "cnnopt.log"))
        cli.quiet_libraries()


def test_an_image_over_pillows_pixel_limit_says_so_and_how_to_shrink_it(tmp_path, monkeypatch):
    """Pillow refuses an image of more than twice `Image.MAX_IMAGE_PIXELS` (179 megapixels; a 200-megapixel phone
    photo) as a possible decompression bomb; the line said "could be decompression bomb DOS attack.; remove or
    replace the file". The limit is lowered here (Pillow's public setting) so a small image is over it."""
    root = write_flat_folder(tmp_path / "pets")  # its biggest image is 40x40: 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1700)  # a warning over it (none of them), refused over 3400
    big = root / "dog" / "panorama.png"
    Image.new("RGB", (90, 40)).save(big)
    with pytest.raises(UsageError) as caught:
        load_data(DataConfig(dataset="imagefolder", root=str(root), cache=False))
    assert str(caught.value) == (f"cannot read image {big}: Image size (3600 pixels) exceeds limit of 3400 pixels, "
                                 "Pillow's guard against decompression bombs; shrink it (e.g. mogrify -resize "
                                 "'8000x8000>' with ImageMagick: training resizes it far smaller) or remove it")


def test_a_data_root_under_the_home_folder_may_be_written_with_a_tilde(tmp_path, monkeypatch):
    """data.root = "~/pets" was "image folder '~/pets' not found" (data.cache_dir took ~ already)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_flat_folder(tmp_path / "pets")
    data = load_data(DataConfig(dataset="imagefolder", root="~/pets", image_size=8, cache=False))
    assert data.class_names == ["cat", "dog"] and len(data.train_y) + len(data.val_y) + len(data.test_y) == 12


def test_an_uncached_folder_over_a_small_memory_limit_says_its_size_in_kilobytes(tmp_path):
    """QA: data.memory_limit_mb=0.001 with data.cache=false said "take 0 MB, more than the 0 MB memory limit"."""
    root = write_flat_folder(tmp_path / "pets")  # 12 images of 3x8x8 bytes: 2.25 KB
    with pytest.raises(UsageError, match=r"take 2.2 KB, more than the 1.0 KB memory limit, and data.cache=false"):
        load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=8, cache=False, memory_limit_mb=0.001))
    from cnnopt.data.cache import megabytes

    assert (megabytes(1.4 * 2**20), megabytes(1.2 * 2**20), megabytes(2**20 - 100)) == ("1.4 MB", "1.2 MB", "1.0 MB")


def test_empty_class_folder_is_an_error(tmp_path):
    root = write_flat_folder(tmp_path / "pets")
    (root / "bird").mkdir()
    with pytest.raises(UsageError) as caught:
        load_data(DataConfig(dataset="imagefolder", root=str(root)))
    assert str(root / "bird") in str(caught.value) and "no images" in str(caught.value)


def test_one_class_is_an_error(tmp_path):
    save(tmp_path / "only" / "a" / "0.png", "L", (4, 4))
    with pytest.raises(UsageError, match="at least two"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "only")))
    for index in range(3):  # images put straight into the root: said, with what to do
        save(tmp_path / "loose" / f"{index}.png", "L", (4, 4))
    with pytest.raises(UsageError, match="found 0 and 3 loose images: move each class's images into a folder"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "loose")))


@pytest.mark.parametrize("root", ["", "missing"])
def test_missing_image_folder_is_an_error(tmp_path, root):
    with pytest.raises(UsageError, match="image folder .* not found.*data.root"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / root) if root else ""))


def test_a_data_root_that_is_a_file_says_so_not_not_found(tmp_path):
    save(tmp_path / "photo.png", "L", (8, 8))
    with pytest.raises(UsageError, match=r"data.root '.*photo.png' is a file, not a folder: set data.root to the folder"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "photo.png")))


def test_image_folder_subset(tmp_path):
    root = write_flat_folder(tmp_path / "pets", modes=("L",), per_class=20)
    config = DataConfig(dataset="imagefolder", root=str(root), image_size=4, val_fraction=0.2, test_fraction=0.2)
    full = load_data(config)
    small = load_data(dataclasses.replace(config, subset=10))
    assert len(full.train_y) == 24 and len(small.train_y) == 10
    assert small.train_y.bincount().tolist() == [5, 5]
