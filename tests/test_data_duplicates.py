"""Val and test images that copy a train image, pixel for pixel: found, said, left out or refused
(`data.duplicates`), in image folders written here with PIL and in the built-in datasets."""

from __future__ import annotations

import dataclasses
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
from cnnopt.data.duplicates import HASH_BYTES, image_hashes
from cnnopt.errors import UsageError
from cnnopt.experiment.config import DataConfig, load_experiment


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


def with_a_copy(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A pre-split folder whose test/ holds a train image again, under another name (and class folder)."""
    root = write_presplit(tmp_path / "set")
    original, copy = root / "train" / "a" / "2.png", root / "test" / "b" / "holiday.png"
    shutil.copy(original, copy)
    return root, original, copy


def test_a_test_image_that_copies_a_train_image_is_one_warning_line(tmp_path, capsys):
    root, original, copy = with_a_copy(tmp_path)
    data = load_data(config(root))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: 1 of 7 test images is a copy of train images")
    assert f"test image {copy} = train image {original}" in err and "data.duplicates=drop" in err
    assert len(data.test_y) == 7 and data.duplicates == {"val": 0, "test": 1}  # warn keeps it
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
    assert dropped.duplicates == {"val": 0, "test": 1}
    assert dropped.test_y.tolist() == [0] * 3 + [1] * 3  # holiday.png sat among b's images


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
    assert data.duplicates == {"val": 1, "test": 1} and len(data.val_y) == 6 and len(data.test_y) == 6
    assert not set(rows(data.val_x)) & set(rows(data.train_x))
    assert not set(rows(data.test_x)) & (set(rows(data.train_x)) | set(rows(data.val_x)))


def test_without_copies_every_setting_gives_the_same_splits_and_says_nothing(tmp_path, capsys):
    root = write_presplit(tmp_path / "set")
    loaded = [load_data(config(root, duplicates=policy)) for policy in ("warn", "drop", "error")]
    for other in loaded[1:]:
        for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            assert torch.equal(getattr(loaded[0], name), getattr(other, name)), name
    assert all(data.duplicates == {"val": 0, "test": 0} for data in loaded)
    assert capsys.readouterr().err == ""


def test_digits_hold_no_copies_and_say_nothing(capsys):
    """The README's default study stays quiet: no digit scan appears twice, so no split copies another."""
    data = load_data(DataConfig())
    assert data.duplicates == {"val": 0, "test": 0} and capsys.readouterr().err == ""
    sampled = load_data(DataConfig(subset=200, duplicates="error"))  # val and test against every train image
    assert sampled.duplicates == {"val": 0, "test": 0}


def test_cifar10_copies_are_named_by_their_batch_and_index(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    test[5] = train[17]  # the official test batch holds a training image again
    for name, data in (("data_batch_1", train), ("test_batch", test)):
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": [i % 10 for i in range(len(data))]}, handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, handle, protocol=2)
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
    assert again.duplicates == first.duplicates == {"val": 0, "test": 1}
    (entry / data_cache.HASHES).unlink()  # an entry written before the hashes were: they are added once
    assert load_data(config(root)).duplicates == {"val": 0, "test": 1}
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
    assert streamed.duplicates == in_memory.duplicates == {"val": 0, "test": 1}
    assert torch.equal(streamed.test_x, in_memory.test_x) and torch.equal(streamed.train_x, in_memory.train_x)


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
