"""The imagefolder path on real photos: crops of the two photographs scikit-learn ships (offline)."""

from __future__ import annotations

import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnopt import train as train_cli


def write_photo_folder(root, per_class=40, seed=0):
    """root/<photo>/<crop>.jpg: random crops of varied size and aspect, saved as JPEG (some as grayscale)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images()
    for name, pixels in zip(("china", "flower"), photos.images):
        folder = root / name
        folder.mkdir(parents=True)
        height, width, _ = pixels.shape
        for index in range(per_class):
            side_h, side_w = rng.integers(80, 200), rng.integers(80, 200)
            top, left = rng.integers(0, height - side_h), rng.integers(0, width - side_w)
            crop = Image.fromarray(pixels[top:top + side_h, left:left + side_w])
            if index % 7 == 0:
                crop = crop.convert("L").convert("RGB")
            crop.save(folder / f"{index:03d}.jpg", quality=90)
    return root


def test_train_on_a_folder_of_real_photos(tmp_path, mlflow_store, capsys):
    root = write_photo_folder(tmp_path / "photos")
    code = train_cli.main(["--set", "data.dataset=imagefolder", "--set", f"data.root={root}",
                           "--set", "data.image_size=32", "--set", "train.epochs=6", "--set", "train.flip=true",
                           "--set", "train.lr=0.02", "--set", "name=photos"])
    assert code == 0
    client = MlflowClient(tracking_uri=mlflow_store)
    run = client.search_runs([client.get_experiment_by_name("photos").experiment_id])[0]
    assert run.data.params["data.dataset"] == "imagefolder"
    assert run.data.metrics["best_val_accuracy"] >= 0.8, "two different photographs are easy to tell apart"
    assert "3x32x32, 2 classes" in capsys.readouterr().out
