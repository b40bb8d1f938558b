"""Val and test images that copy a train image, pixel for pixel: found, said, left out or refused
(`data.duplicates`), in image folders written here with PIL and in the built-in datasets."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnopt import train as train_cli
from cnnopt.cli import run
from cnnopt.data import cache as data_cache
from cnnopt.data import datasets as data_module
from cnnopt.data.datasets import load_data
from cnnopt.data import duplicates
from cnnopt.data.duplicates import HASH_BYTES, Counts, image_hashes
from cnnopt.errors import UsageError
from cnnopt.experiment.config import DataConfig, load_experiment
from cnnopt.tracking.provenance import duplicate_tags


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    """Each test caches decoded image folders in its own folder, never in the user's."""
    monkeypatch.setenv("CNNOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rows(x: torch.Tensor) -> Counter:
    """Each image's bytes, counted: equal Counters mean the same images, duplicates included."""
    return Counter(image.numpy().tobytes() for image in x)


def write_presplit(root: Path, counts=(("train", 6), ("val", 3), ("test", 3))) -> Path:
    """root/train|val|test/<a|b>/<n>.png: random 10x10 RGB images, every one different."""
    rng = np.random.default_rng(0)
    for split, count in counts:
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    return root


def config(root: Path, **changes) -> DataConfig:
    return DataConfig(**{"dataset": "imagefolder", "root": str(root), "image_size": 8, **changes})


def write_cifar(folder: Path, train: np.ndarray, test: np.ndarray) -> Path:
    """folder/cifar-10-batches-py in CIFAR-10's python format: one train batch, the test batch, the class names."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    for name, data in (("data_batch_1", train), ("test_batch", test)):
        with open(batches / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": [i % 10 for i in range(len(data))]}, handle, protocol=2)
    with open(batches / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, handle, protocol=2)
    return batches


def with_a_copy(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A pre-split folder whose test/ holds a train image again, under another name (in its own class: under
    another, it is also a label conflict, `test_an_image_under_two_classes_is_one_warning_line`)."""
    root = write_presplit(tmp_path / "set")
    original, copy = root / "train" / "a" / "2.png", root / "test" / "a" / "holiday.png"
    shutil.copy(original, copy)
    return root, original, copy


def test_a_test_image_that_copies_a_train_image_is_one_warning_line(tmp_path, capsys):
    root, original, copy = with_a_copy(tmp_path)
    data = load_data(config(root))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: 1 of 7 test images is a copy of train images")
    assert f"test image {copy} = train image {original}" in err and "data.duplicates=drop" in err
    assert len(data.test_y) == 7 and data.duplicates == Counts(val=0, test=1, dropped=False)  # warn keeps it
    load_data(config(root))
    assert capsys.readouterr().err == "", "said once, however often the data loads (a study loads it again)"


@pytest.mark.parametrize("cache", [True, False])
def test_drop_leaves_the_copy_out_of_test_and_changes_nothing_else(tmp_path, capsys, cache):
    root, original, copy = with_a_copy(tmp_path)
    kept = load_data(config(root, cache=cache))
    dropped = load_data(config(root, cache=cache, duplicates="drop"))
    assert "data.duplicates=drop: left out 1 of 7 test images" in capsys.readouterr().err
    for name in ("train_x", "train_y", "val_x", "val_y"):
        assert torch.equal(getattr(kept, name), getattr(dropped, name)), name
    assert kept.mean == dropped.mean and kept.std == dropped.std
    the_copy = rows(kept.test_x) - rows(dropped.test_x)
    assert len(dropped.test_y) == 6 and sum(the_copy.values()) == 1
    assert next(iter(the_copy)) in rows(kept.train_x), "the image left out is the train image's copy"
    assert dropped.duplicates == Counts(val=0, test=1, dropped=True)
    assert dropped.test_y.tolist() == [0] * 3 + [1] * 3  # holiday.png sat among a's images


def test_error_is_one_line_naming_the_copy_and_the_fix(tmp_path):
    root, original, copy = with_a_copy(tmp_path)
    with pytest.raises(UsageError) as caught:
        load_data(config(root, duplicates="error"))
    message = str(caught.value)
    assert "\n" not in message and str(copy) in message and str(original) in message
    assert "1 of 7 test images is a copy of train images" in message and "data.duplicates=drop" in message


def test_error_from_the_command_line_is_exit_2_before_any_run(mlflow_store, tmp_path, capsys):
    root, _, _ = with_a_copy(tmp_path)
    with pytest.raises(SystemExit) as caught:
        run(train_cli.main, ["--set", "data.dataset=imagefolder", "--set", f"data.root={root}", "--set", "name=set",
                             "--set", "data.duplicates=error"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.startswith("error: 1 of 7 test images is a copy") and err.count("\n") == 1
    assert "Traceback" not in err and not (tmp_path / "mlflow.db").exists()


def test_a_val_copy_and_a_test_copy_of_val_are_found_too(tmp_path, capsys):
    root = write_presplit(tmp_path / "set")
    shutil.copy(root / "train" / "b" / "0.png", root / "val" / "b" / "again.png")
    shutil.copy(root / "val" / "a" / "1.png", root / "test" / "a" / "again.png")  # a val image only
    data = load_data(config(root, duplicates="drop"))
    assert "left out 1 of 7 val images and 1 of 7 test images, copies of train or val images" in capsys.readouterr().err
    assert data.duplicates == Counts(val=1, test=1, dropped=True) and len(data.val_y) == 6 and len(data.test_y) == 6
    assert not set(rows(data.val_x)) & set(rows(data.train_x))
    assert not set(rows(data.test_x)) & (set(rows(data.train_x)) | set(rows(data.val_x)))


def test_without_copies_every_setting_gives_the_same_splits_and_says_nothing(tmp_path, capsys):
    root = write_presplit(tmp_path / "set")
    loaded = [load_data(config(root, duplicates=policy)) for policy in ("warn", "drop", "error")]
    for other in loaded[1:]:
        for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            assert torch.equal(getattr(loaded[0], name), getattr(other, name)), name
    assert all(data.duplicates == Counts(val=0, test=0, dropped=False) for data in loaded)
    assert capsys.readouterr().err == ""


def test_digits_hold_no_copies_and_say_nothing(capsys):
    """The README's default study stays quiet: no digit scan appears twice, so no split copies another."""
    data = load_data(DataConfig())
    assert data.duplicates == Counts(val=0, test=0, dropped=False) and capsys.readouterr().err == ""
    sampled = load_data(DataConfig(subset=200, duplicates="error"))  # val and test against every train image
    assert sampled.duplicates == Counts(val=0, test=0, dropped=False)


def test_cifar10_copies_are_named_by_their_batch_and_index(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    test[5] = train[17]  # the official test batch holds a training image again
    write_cifar(tmp_path, train, test)
    settings = DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.25, duplicates="drop")
    data = load_data(settings)
    err = capsys.readouterr().err
    assert "left out 1 of 20 test images" in err
    assert "test image cifar10 test_batch #5 = train image cifar10 data_batch_1 #17" in err
    assert len(data.test_y) == 19 and len(data.train_y) == 30 and len(data.val_y) == 10  # train and val as always


def test_a_cache_entry_stores_the_hashes_and_a_later_load_reads_them(tmp_path, cache_folder, monkeypatch):
    root, _, _ = with_a_copy(tmp_path)
    first = load_data(config(root))
    entry = next(cache_folder.iterdir())
    stored = np.load(entry / data_cache.HASHES)
    images = np.load(entry / "images.npy")
    assert stored.shape == (len(images), HASH_BYTES) and np.array_equal(stored, image_hashes(images))

    def no_hashing(*args, **kwargs):
        raise AssertionError("a cached folder's images were hashed again")

    with monkeypatch.context() as patch:
        patch.setattr(data_module.duplicates, "image_hashes", no_hashing)
        patch.setattr(data_cache, "image_hashes", no_hashing)
        again = load_data(config(root))
    assert again.duplicates == first.duplicates == Counts(val=0, test=1, dropped=False)
    (entry / data_cache.HASHES).unlink()  # an entry written before the hashes were: they are added once
    assert load_data(config(root)).duplicates == Counts(val=0, test=1, dropped=False)
    assert np.array_equal(np.load(entry / data_cache.HASHES), stored)


def test_a_streamed_train_split_is_checked_from_the_stored_hashes(tmp_path, monkeypatch):
    root, _, _ = with_a_copy(tmp_path)
    streamed = load_data(config(root, memory_limit_mb=0.0001, duplicates="drop"))  # 12 images of 192 bytes: over it

    def no_hashing(images):
        raise AssertionError("a load from the cache hashed the images again instead of reading hashes.npy")

    monkeypatch.setattr(data_cache, "image_hashes", no_hashing)
    monkeypatch.setattr(data_module.duplicates, "image_hashes", no_hashing)
    in_memory = load_data(config(root, duplicates="drop"))
    assert streamed.streamed and not in_memory.streamed
    assert streamed.duplicates == in_memory.duplicates == Counts(val=0, test=1, dropped=True)
    assert torch.equal(streamed.test_x, in_memory.test_x) and torch.equal(streamed.train_x, in_memory.train_x)


@pytest.mark.parametrize("split", ["val", "test"])
def test_drop_that_empties_a_split_says_the_copies_did_and_how_to_keep_them(tmp_path, split):
    root = write_presplit(tmp_path / "set", (("train", 4), ("val", 1), ("test", 1)))
    for name in ("a", "b"):  # the split's only images, one per class, are train images again
        shutil.copy(root / "train" / name / "3.png", root / split / name / "0.png")
    load_data(config(root))  # warn: the split keeps them
    with pytest.raises(UsageError) as caught:
        load_data(config(root, duplicates="drop"))
    message = str(caught.value)
    assert message.startswith(f"data.duplicates=drop would leave no {split} images: 2 of 2 {split} images are copies "
                              f"of train images, pixel for pixel (e.g. {split} image {root / split / 'a' / '0.png'} = "
                              f"train image {root / 'train' / 'a' / '3.png'})")
    assert f"remove the copies from {root}" in message and "data.duplicates=warn" in message
    assert "val_fraction" not in message and "\n" not in message


def test_drop_that_empties_val_and_test_names_both(tmp_path):
    root = write_presplit(tmp_path / "set", (("train", 4), ("val", 1), ("test", 1)))
    for split in ("val", "test"):
        for name in ("a", "b"):
            shutil.copy(root / "train" / name / "3.png", root / split / name / "0.png")
    with pytest.raises(UsageError, match="^data.duplicates=drop would leave no val and no test images: "):
        load_data(config(root, duplicates="drop"))


def test_the_dropped_flag_is_what_the_load_did_and_the_tags_read_it(tmp_path):
    root, _, _ = with_a_copy(tmp_path)
    dropped = load_data(config(root, duplicates="drop")).duplicates
    kept = load_data(config(root)).duplicates
    clean = load_data(config(write_presplit(tmp_path / "clean"), duplicates="drop")).duplicates
    assert (dropped.dropped, kept.dropped, clean.dropped) == (True, False, False)
    assert duplicate_tags(dropped) == {
        "duplicate_val_images": "0", "duplicate_test_images": "1", "duplicates_dropped": "true",
        "conflicting_label_images": "0"}
    assert duplicate_tags(kept)["duplicates_dropped"] == "false"
    assert duplicate_tags(None) == {}  # data built without a load (a benchmark's): no tags


@pytest.fixture
def hashings(monkeypatch) -> list[int]:
    """How many images `duplicates.image_hashes` has hashed since the test began, one entry a call."""
    counted, original = [], duplicates.image_hashes

    def counting(images):
        counted.append(len(images))
        return original(images)

    monkeypatch.setattr(duplicates, "image_hashes", counting)
    return counted


def test_digits_are_hashed_once_per_process(hashings):
    load_data(DataConfig())
    load_data(DataConfig(subset=200, seed=3))  # a budget's subset, another seed: the same images
    assert hashings in ([], [1797]), "at most once (none where an earlier test of this process loaded them)"


def test_cifar10_is_hashed_once_per_process_until_a_batch_changes(tmp_path, hashings):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    batches = write_cifar(tmp_path, train, test)
    settings = DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.25)
    assert load_data(settings).duplicates.test == 0
    assert load_data(dataclasses.replace(settings, subset=20)).duplicates.test == 0
    assert hashings == [40, 20], "the train batch and the test batch, once"
    test[5] = train[17]  # the test batch rewritten with a train image: the same size, another mtime
    write_cifar(tmp_path, train, test)
    stat = (batches / "test_batch").stat()  # a later mtime, as a rewrite seconds later has
    os.utime(batches / "test_batch", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_data(settings).duplicates.test == 1
    assert hashings == [40, 20, 40, 20]


def test_an_uncached_folder_is_hashed_once_per_process_until_a_file_changes(tmp_path, hashings):
    root = write_presplit(tmp_path / "set")
    settings = config(root, cache=False)
    assert load_data(settings).duplicates.test == 0
    assert load_data(dataclasses.replace(settings, subset=4)).duplicates.test == 0
    assert hashings == [12, 6, 6], "the train, val and test folders' images, once"
    shutil.copy(root / "train" / "a" / "2.png", root / "test" / "b" / "holiday.png")
    assert load_data(settings).duplicates.test == 1
    assert hashings == [12, 6, 6, 12, 6, 7]


def test_val_and_test_are_checked_against_every_train_image_not_the_subset(tmp_path):
    """A budget's subset leaves train images out; a test image copying one is still a copy (and the same
    val and test images are scored at every subset size)."""
    root, _, _ = with_a_copy(tmp_path)
    full = load_data(config(root, duplicates="drop"))
    [the_copy] = rows(load_data(config(root)).test_x) - rows(full.test_x)
    for seed in range(8):  # a seed whose subset of 2 leaves the original (train/a/2.png) out
        small = load_data(config(root, subset=2, seed=seed, duplicates="drop"))
        if the_copy not in rows(small.train_x):
            break
    else:
        pytest.fail("every seed's subset kept the original")
    assert small.duplicates == Counts(val=0, test=1, dropped=True)
    assert torch.equal(small.test_x, full.test_x) and torch.equal(small.val_x, full.val_x)


def test_the_setting_is_checked_where_it_enters():
    with pytest.raises(UsageError, match=r"data.duplicates = 'skip' is not allowed: it must be 'warn', 'drop' or "
                                         r"'error'; fix it in the experiment file or with --set data.duplicates"):
        load_experiment(None, ["data.duplicates=skip"])
    with pytest.raises(UsageError, match="data.duplicates = 'Drop' is not allowed"):
        load_data(dataclasses.replace(DataConfig(), duplicates="Drop"))


def test_the_count_is_a_tag_of_the_run(mlflow_store, tmp_path, capsys):
    root, _, _ = with_a_copy(tmp_path)
    with pytest.raises(SystemExit) as caught:
        run(train_cli.main, ["--set", "data.dataset=imagefolder", "--set", f"data.root={root}", "--set", "name=set",
                             "--set", "data.image_size=8", "--set", "train.epochs=1", "--set", "train.batch_size=4",
                             "--set", "train.device=cpu", "--set", "data.duplicates=drop"])
    assert caught.value.code == 0
    client = MlflowClient(tracking_uri=mlflow_store)  # this test's store, whatever an earlier test made mlflow's default
    [only] = client.search_runs([client.get_experiment_by_name("set").experiment_id])
    assert (only.data.tags["duplicate_test_images"], only.data.tags["duplicate_val_images"]) == ("1", "0")
    assert only.data.tags["duplicates_dropped"] == "true" and only.data.params["data.duplicates"] == "drop"


def test_a_study_tags_its_parent_run_with_the_count_before_any_promotion(mlflow_store, ray_session, tmp_path):
    from cnnopt import search

    root, _, _ = with_a_copy(tmp_path)
    code = search.main(["--strategy", "random", "--trials", "1", "--name", "copies", "--no-promote", "--no-report",
                        "--set", "name=copies", "--set", "train.epochs=1", "--set", "train.batch_size=4",
                        "--set", "data.dataset=imagefolder", "--set", f"data.root={root}", "--set", "data.image_size=8"])
    assert code == 0
    client = MlflowClient(tracking_uri=mlflow_store)
    parents = client.search_runs([client.get_experiment_by_name("copies").experiment_id], "tags.`cnnopt.kind` = 'study'")
    assert [run.data.tags.get("duplicate_test_images") for run in parents] == ["1"]
    assert parents[0].data.tags["duplicates_dropped"] == "false" and "promoted_run_id" not in parents[0].data.tags


def test_an_image_under_two_classes_is_one_warning_line_and_a_tag(tmp_path, capsys):
    """The same photo in two class folders (here train/a and test/b: also a test copy of a train image): said
    in one line naming both files, counted on the data and its runs' tags, refused under data.duplicates=error."""
    root = write_presplit(tmp_path / "set")
    original, other = root / "train" / "a" / "2.png", root / "test" / "b" / "holiday.png"
    shutil.copy(original, other)
    data = load_data(config(root))
    err = capsys.readouterr().err.splitlines()
    conflict = [line for line in err if "under two or more classes" in line]
    assert conflict == [f"warning: 2 images are under two or more classes, pixel for pixel (e.g. {original} = "
                        f"{other}): a model cannot get both labels right, and its scores count the one it gets "
                        f"wrong; keep each image in one class folder of {root}"]
    assert data.duplicates == Counts(val=0, test=1, dropped=False, conflicts=2)
    assert duplicate_tags(data.duplicates)["conflicting_label_images"] == "2"
    with pytest.raises(UsageError, match=r"^2 images are under two or more classes.*data.duplicates=warn"):
        load_data(config(root, duplicates="error"))


def test_images_under_two_classes_within_one_split_are_found_and_the_same_class_twice_is_not(tmp_path, capsys):
    """Within train: a copy in the other class is a conflict (both images counted); a copy in the same class
    is not (it is a duplicate, not a contradiction)."""
    root = write_presplit(tmp_path / "set")
    shutil.copy(root / "train" / "a" / "0.png", root / "train" / "a" / "again.png")
    assert load_data(config(root)).duplicates.conflicts == 0 and capsys.readouterr().err == ""
    for copy in ("x.png", "y.png"):
        shutil.copy(root / "train" / "b" / "1.png", root / "train" / "a" / copy)
    assert load_data(config(root, cache=False)).duplicates.conflicts == 3  # b/1.png and its two copies in a/


def test_conflicts_marks_every_image_of_pixels_seen_under_two_labels():
    hashes = np.zeros((6, HASH_BYTES), np.uint8)
    hashes[:, 0] = [1, 2, 1, 3, 2, 1]
    mixed, pair = duplicates.conflicts(hashes, np.array([0, 0, 1, 0, 0, 0]))
    assert mixed.tolist() == [True, False, True, False, False, True] and pair == (0, 2)
    assert duplicates.conflicts(hashes, np.zeros(6, int))[0].sum() == 0
    assert duplicates.conflicts(hashes[:0], np.zeros(0, int))[1] is None


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_a_class_folder_linking_to_another_is_refused_naming_the_link(tmp_path):
    root = write_presplit(tmp_path / "set", counts=(("train", 6),))
    (root / "train" / "c").symlink_to(root / "train" / "a", target_is_directory=True)
    with pytest.raises(UsageError) as error:
        load_data(config(root))
    assert str(error.value).startswith(f"class folders a/ and c/ of {root / 'train'} are one folder (c/ links to "
                                       f"{(root / 'train' / 'a').resolve()}): each of its images would be both classes")
