"""Image folders at scale: drafted and parallel decoding, the decoded-data cache, streamed train splits."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnopt.data import cache as data_cache
from cnnopt.data import datasets as data_module
from cnnopt.data import decode
from cnnopt.experiment.config import DataConfig, TrainConfig
from cnnopt.data.datasets import load_data
from cnnopt.errors import UsageError
from cnnopt.training.objective import train

SPLITS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    """Each test caches in its own folder, never in the user's."""
    monkeypatch.setenv("CNNOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_photos(root: Path, per_class: int = 6, scale: float = 2.5, seed: int = 0) -> Path:
    """root/<photo>/<n>.jpg: crops of scikit-learn's two photographs, upscaled to ~500-1600 px, some gray."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    for name, pixels in zip(("china", "flower"), load_sample_images().images):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            height, width = rng.integers(200, 420), rng.integers(200, 620)
            top, left = rng.integers(0, 427 - height), rng.integers(0, 640 - width)
            crop = Image.fromarray(pixels[top:top + height, left:left + width])
            crop = crop.resize((int(width * scale), int(height * scale)), Image.Resampling.BICUBIC)
            (crop.convert("L") if index % 3 == 0 else crop).save(root / name / f"{index:03d}.jpg", quality=90)
    return root


def write_pngs(root: Path, per_class: int = 20, side: int = 12) -> Path:
    """root/<class>/<n>.png: small noisy RGB images, fast to decode."""
    rng = np.random.default_rng(1)
    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 120, (side, side, 3), dtype=np.uint8) + 120 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index:02d}.png")
    return root


def same_data(one, other) -> bool:
    return all(torch.equal(getattr(one, name), getattr(other, name)) for name in SPLITS) and \
        one.class_names == other.class_names


def mapped_file(x: torch.Tensor) -> str | None:
    """The file whose memory mapping holds x's data, from /proc/self/maps (None: anonymous memory)."""
    address = x.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(value, 16) for value in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) >= 6 and fields[5].startswith("/") else None
    return None


# ----- decoding -----


@pytest.mark.parametrize("size", [16, 32, 64])
def test_drafted_jpeg_decode_is_within_one_gray_level_of_the_full_decode(tmp_path, size):
    root = write_photos(tmp_path / "photos")
    for path in sorted(root.rglob("*.jpg")):
        for channels in (1, 3):
            drafted = decode.decode_image(path, channels, size).astype(int)
            full = decode.decode_image(path, channels, size, draft=False).astype(int)
            assert drafted.shape == full.shape == (channels, size, size)
            # Measured on these photos: mean 0.1-0.8 levels per image, a single pixel at most ~10.
            assert np.abs(drafted - full).mean() <= 1.0, path
            assert np.abs(drafted - full).max() <= 24, path


def test_drafted_decode_gives_the_target_side_for_any_jpeg_size(tmp_path):
    rng = np.random.default_rng(0)
    for width, height in rng.integers(60, 700, (40, 2)):  # drafted sides round up: 1/2, 1/4, 1/8 of odd sizes
        path = tmp_path / f"{width}x{height}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        for size in (8, 16, 32):
            assert decode.decode_image(path, 3, size).shape == (3, size, size), path.name


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("height, width", [(400, 600), (403, 601)])
def test_an_exif_orientation_is_applied_by_training_and_predict_alike(tmp_path, orientation, height, width):
    """A phone stores a portrait photo as landscape pixels tagged "rotate 90": both readers show it upright. (Of
    an odd size, a drafted JPEG's partial last pixels, turned to the top or left, shifted the picture.)"""
    from PIL import ExifTags, ImageOps

    rows, cols = np.mgrid[0:height, 0:width]  # landscape pixels, no two corners alike: red grows right, green down
    pixels = np.stack([cols * 255 // (width - 1), rows * 255 // (height - 1), np.full_like(rows, 60)],
                      -1).astype(np.uint8)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    with Image.open(path) as stored:  # what a viewer shows: Pillow's own reading of the tag, full scale
        shown = torch.from_numpy(np.array(ImageOps.exif_transpose(stored))).permute(2, 0, 1).unsqueeze(0)
    as_stored = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).unsqueeze(0)
    assert shown.shape[2:] == ((width, height) if orientation >= 5 else (height, width))
    for size, drafted in ((16, True), (64, True), (16, False)):  # 1/8 and 1/2 JPEG drafts, and the full decode
        decoded = decode.decode_image(path, 3, size, draft=drafted).astype(int)
        upright = decode.resize_center_crop(shown, size)[0].numpy().astype(int)
        assert np.abs(decoded - upright).mean() <= 1.0, (size, drafted)
        if orientation != 1:  # and it is not the stored pixels' picture
            stored_picture = decode.resize_center_crop(as_stored, size)[0].numpy().astype(int)
            assert np.abs(decoded - stored_picture).mean() > 10, (size, drafted)


def test_an_image_whose_exif_pillow_cannot_read_loads_as_stored(tmp_path):
    """A PNG with a malformed EXIF block made Pillow raise in getexif: one odd file stopped the folder's load."""
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    for name, exif in (("not-tiff.png", b"II"), ("header-only.png", b"II*\x00")):
        Image.fromarray(pixels).save(tmp_path / name, exif=exif)
        expected = decode.resize_center_crop(torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0), 8)[0].numpy()
        assert np.array_equal(decode.decode_image(tmp_path / name, 3, 8), expected), name


def test_decoding_spreads_a_small_folder_over_its_threads_and_stops_soon_when_left(tmp_path, monkeypatch):
    """A folder of one chunk decoded on one thread (32 large PNGs: one core of 16 busy); and a caller that left
    (a Ctrl-C in predict) waited for every started chunk to finish its 32 files (5.4 s to exit, not 0.7)."""
    import threading

    paths = []
    for index in range(8):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(np.full((4, 4, 3), index * 30, np.uint8)).save(paths[-1])
    real, threads = decode._decode, []

    def slow(*args, **kwargs):  # a large image: 50 ms each
        threads.append(threading.get_ident())
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "_decode", slow)
    chunks = list(decode.decode_chunks(paths, 3, 4, workers=4))
    assert all(error is None for _, _, errors in chunks for error in errors)
    assert [len(files) for files, _, _ in chunks] == [2, 2, 2, 2] and len(set(threads)) == 4
    assert [files for files, _, _ in chunks] == [paths[i:i + 2] for i in range(0, 8, 2)]
    assert all(images[row, 0, 0, 0] == (2 * index + row) * 30 for index, (_, images, _) in enumerate(chunks)
               for row in range(2))
    many = paths * 16  # 128 files: chunks of 32 (1.6 s each), 2 running at a time
    decoded = decode.decode_chunks(many, 3, 4, workers=2)
    next(decoded)
    threads.clear()
    start = time.perf_counter()
    decoded.close()  # the caller has gone: the running chunks stop within a file
    assert time.perf_counter() - start < 0.8 and len(threads) <= 6, len(threads)


def test_parallel_decode_equals_serial_and_shows_progress(tmp_path, monkeypatch, capsys):
    root = write_photos(tmp_path / "photos", per_class=8)
    paths = sorted(root.rglob("*.jpg"))
    serial = decode.decode_files(paths, 32, workers=1)
    monkeypatch.setattr(decode, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(decode, "CHUNK", 4)
    parallel = decode.decode_files(paths, 32, workers=2, label="photos")
    assert parallel.shape == (16, 3, 32, 32) and np.array_equal(parallel, serial)
    err = capsys.readouterr().err
    assert "decoding photos:" in err and "img/s" in err and "decoded photos: 16 images" in err


def test_a_corrupt_file_is_reported_from_a_decoding_thread(tmp_path, monkeypatch):
    root = write_photos(tmp_path / "photos")
    bad = root / "china" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    monkeypatch.setattr(decode, "CHUNK", 4)
    with pytest.raises(UsageError, match=f"cannot read image {bad}"):
        load_data(DataConfig(dataset="imagefolder", root=str(root), decode_workers=2))


# ----- the cache -----


def test_cached_load_equals_uncached_and_does_not_decode(tmp_path, cache_folder, monkeypatch):
    root = write_photos(tmp_path / "photos")
    config = DataConfig(dataset="imagefolder", root=str(root), image_size=16, val_fraction=0.25, test_fraction=0.25)
    uncached = load_data(dataclasses.replace(config, cache=False))
    first = load_data(config)
    entries = [p for p in cache_folder.iterdir()]
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"images.npy", "index.json", "hashes.npy"}

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached folder was decoded again")

    monkeypatch.setattr(data_module, "decode_files", no_decoding)
    second = load_data(config)
    # Same images in the same splits, in the same order: the cache never changes the split.
    assert same_data(uncached, first) and same_data(first, second)
    assert first.mean == uncached.mean == second.mean and first.std == second.std
    assert not second.streamed and mapped_file(second.train_x) is None  # copied out of the cache file
    other_seed = load_data(dataclasses.replace(config, seed=1))
    assert not torch.equal(other_seed.val_x, second.val_x)  # the split is still the seed's


@pytest.mark.parametrize("change", ["modified", "added", "removed"])
def test_a_changed_added_or_removed_file_invalidates_the_cache(tmp_path, cache_folder, change, capsys):
    root = write_pngs(tmp_path / "set")
    config = DataConfig(dataset="imagefolder", root=str(root), image_size=8)
    before = load_data(config)
    [older] = list(cache_folder.iterdir())
    target = root / "a" / "03.png"
    if change == "modified":
        Image.new("RGB", (12, 12), (255, 0, 0)).save(target)
        os.utime(target, ns=(1, 1))  # a new mtime even on a coarse-grained file system
    elif change == "added":
        Image.new("RGB", (12, 12), (255, 0, 0)).save(root / "a" / "99.png")
    else:
        target.unlink()
    after = load_data(config)
    assert len(list(cache_folder.iterdir())) == 2
    assert same_data(after, load_data(dataclasses.replace(config, cache=False)))
    every = torch.cat([after.train_x, after.val_x, after.test_x])
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    assert int((every == red).all(dim=(1, 2, 3)).sum()) == (0 if change == "removed" else 1)
    total = sum(len(getattr(after, name)) for name in ("train_y", "val_y", "test_y"))
    assert total == 40 + {"modified": 0, "added": 1, "removed": -1}[change]
    assert not same_data(before, after)
    # The entry it replaces stays (a study still running may read it) and is said, with how to remove it.
    err = capsys.readouterr().err
    assert (f"warning: the image cache {cache_folder} holds 1 older decoded copy of {root.resolve()} (" in err
            and err.rstrip().endswith(f"rm -r {older}")), err
    assert oct(older.stat().st_mode & 0o777) == oct(0o777 & ~current_umask()), "readable by a shared cache's users"


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    assert data_cache.umask() == mask
    return mask


def test_another_image_size_is_another_entry(tmp_path, cache_folder):
    root = write_pngs(tmp_path / "set")
    small = load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=8))
    large = load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=10))
    assert small.image_size == 8 and large.image_size == 10 and len(list(cache_folder.iterdir())) == 2


def test_an_interrupted_decode_leaves_no_entry(tmp_path, cache_folder, monkeypatch):
    root = write_pngs(tmp_path / "set")
    config = DataConfig(dataset="imagefolder", root=str(root), image_size=8)
    real = data_module.decode_files

    def interrupted(*args, allocate, **kwargs):
        allocate((40, 3, 8, 8))[:5] = 7  # half written, then the process is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(data_module, "decode_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_data(config)
    assert list(cache_folder.iterdir()) == []
    monkeypatch.setattr(data_module, "decode_files", real)
    assert same_data(load_data(config), load_data(dataclasses.replace(config, cache=False)))


def test_a_damaged_entry_is_decoded_again(tmp_path, cache_folder, capsys):
    root = write_pngs(tmp_path / "set")
    config = DataConfig(dataset="imagefolder", root=str(root), image_size=8)
    expected = load_data(config)
    entry = next(cache_folder.iterdir())
    (entry / "index.json").write_text("{ truncated")
    assert same_data(load_data(config), expected)
    assert "damaged cache entry" in capsys.readouterr().err


def test_an_unwritable_cache_folder_names_the_setting(tmp_path):
    root = write_pngs(tmp_path / "set")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(UsageError, match="data.cache_dir"):
        load_data(DataConfig(dataset="imagefolder", root=str(root), cache_dir=str(blocker / "cache")))


@contextlib.contextmanager
def unwritable(folder: Path):
    """`folder` exists but cannot be written, even by root (immutable: chattr, on the ext4 /tmp here), for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:
        subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
    try:
        yield folder
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_an_existing_cache_folder_that_cannot_be_written_is_one_line(tmp_path):
    root = write_pngs(tmp_path / "set")
    with unwritable(tmp_path / "cache") as cache:
        with pytest.raises(UsageError, match="cannot write the decoded-image cache .*data.cache_dir"):
            load_data(DataConfig(dataset="imagefolder", root=str(root), cache_dir=str(cache)))


def test_a_broken_link_among_the_images_is_one_line_with_the_cache_on(tmp_path):
    root = write_pngs(tmp_path / "set")
    (root / "a" / "zz-broken.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(UsageError, match="cannot read image .*zz-broken.png.*remove or replace"):
        load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=8))


# ----- data bigger than the memory limit -----


def streamed_config(root: Path, **changes) -> DataConfig:
    # 40 images of 3x8x8 = 192 bytes; about 28 go to train (5.4 KB), over a limit of ~1 KB.
    settings = {"dataset": "imagefolder", "root": str(root), "image_size": 8, "memory_limit_mb": 0.001}
    return DataConfig(**{**settings, **changes})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_train_split_over_the_memory_limit_is_memory_mapped(tmp_path):
    root = write_pngs(tmp_path / "set")
    streamed = load_data(streamed_config(root))
    in_memory = load_data(streamed_config(root, memory_limit_mb=0))
    assert streamed.streamed and not in_memory.streamed
    assert mapped_file(streamed.train_x) == streamed.train_path and Path(streamed.train_path).is_file()
    assert mapped_file(streamed.val_x) is None  # val and test are small and stay in memory
    assert same_data(streamed, in_memory)
    assert streamed.mean == pytest.approx(in_memory.mean, abs=1e-9)
    assert streamed.std == pytest.approx(in_memory.std, abs=1e-9)
    # Sent to a Ray trial, the split travels as its path and is mapped again there.
    sent = pickle.dumps(streamed)
    assert len(sent) < streamed.train_x.numel()
    received = pickle.loads(sent)
    assert mapped_file(received.train_x) == streamed.train_path and same_data(received, streamed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_final_training_on_train_and_val_streams_them_too(tmp_path):
    """Over the memory limit, train + val are joined in a file (once), not in memory."""
    from cnnopt.experiment.config import load_experiment
    from cnnopt.study.final import final_data

    root = write_pngs(tmp_path / "set")
    experiment = load_experiment(None, [f"data.{key}={value}" for key, value in
                                        dataclasses.asdict(streamed_config(root)).items() if value != ""]
                                 + ["search.final_data=train+val"])
    split = load_data(experiment.data)
    joined = final_data(experiment)
    assert joined.streamed and mapped_file(joined.train_x) == joined.train_path != split.train_path
    assert torch.equal(joined.train_x, torch.cat([split.train_x, split.val_x]))
    assert torch.equal(joined.train_y, torch.cat([split.train_y, split.val_y])) and len(joined.val_y) == 0
    assert joined.mean == split.mean and joined.std == split.std, "normalised as the train split"
    again = final_data(experiment)
    assert again.train_path == joined.train_path, "written once"
    received = pickle.loads(pickle.dumps(joined))  # as a Ray worker gets it: the path, mapped there
    assert mapped_file(received.train_x) == joined.train_path


def test_streaming_without_the_cache_is_refused(tmp_path):
    root = write_pngs(tmp_path / "set")
    with pytest.raises(UsageError, match="data.cache=false; set data.cache=true"):
        load_data(streamed_config(root, cache=False))


def test_a_streamed_train_split_trains(tmp_path):
    root = write_pngs(tmp_path / "set")
    data = load_data(streamed_config(root))
    assert data.streamed
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, flip=True, crop_padding=1, device="cpu")
    result = train(config, data)
    assert result.status == "completed" and result.epochs_run == 2
    assert np.isfinite(result.best_metrics["train_loss"]) and result.best_metrics["val_accuracy"] > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu: needs a CUDA GPU")
def test_a_streamed_train_split_trains_on_the_gpu(tmp_path):
    root = write_pngs(tmp_path / "set")
    data = load_data(streamed_config(root))
    config = TrainConfig(epochs=2, batch_size=8, flip=True, crop_padding=1, device="cuda")
    result = train(config, data)  # batches gathered on the host, moved one at a time
    assert data.train_x.device.type == "cpu" and result.status == "completed" and result.epochs_run == 2


@pytest.mark.slow
def test_a_study_on_a_folder_over_the_memory_limit(tmp_path, ray_session, mlflow_store):
    from mlflow.tracking import MlflowClient

    from cnnopt import search

    root = write_pngs(tmp_path / "set")
    code = search.main(["--strategy", "random", "--trials", "2", "--name", "streamed", "--no-promote",
                        "--set", "name=streamed", "--set", "train.epochs=1", "--set", "train.batch_size=8",
                        "--set", "data.dataset=imagefolder", "--set", f"data.root={root}",
                        "--set", "data.image_size=8", "--set", "data.memory_limit_mb=0.001"])
    assert code == 0
    client = MlflowClient(tracking_uri=mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("streamed").experiment_id])
    trials = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(trials) == 2 and all(run.data.tags["status"] == "completed" for run in trials)
