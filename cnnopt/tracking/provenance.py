"""Where a run came from, in MLflow's own terms, so the UI's standard columns fill in.

- Source: tags `mlflow.source.name` (the command: `python -m cnnopt.search`) and `mlflow.source.type`
  = LOCAL; the code version as `mlflow.source.git.commit` when cnnopt runs from a git checkout
  (absent otherwise), and the package version as `cnnopt.version`. Built once per process and put on
  every run by `store.start_run`.
- Dataset: the train split a run trained on, as an MLflow dataset input (name, source, digest of the
  split's uint8 images and labels, context `train`). A study computes it once, in the driver.
- Duplicates: how many val and test images copied a train image when the data loaded, and whether the
  load left them out, as tags (`duplicate_tags`), so `mlflow.search_runs` shows which scores were optimistic.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, SourceType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

from cnnopt.experiment.config import DataConfig

if TYPE_CHECKING:  # the data package imports torch, which a process that only records runs need not load
    from cnnopt.data.duplicates import Counts

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the cnnopt package folder
VERSION_TAG = "cnnopt.version"
DIGITS_SOURCE = "sklearn digits"  # scikit-learn's bundled copy (sklearn.datasets.load_digits), no root


@functools.lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """MLflow's source tags for runs this process creates: the command, LOCAL, the commit, the version."""
    tags = {MLFLOW_SOURCE_NAME: command(), MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
            VERSION_TAG: package_version()}
    commit = git_commit(PACKAGE_DIR)
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def command() -> str:
    """The command that started this process: `python -m <module>` for a module, `python <script>` for a file."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    script = sys.argv[0] if sys.argv else ""
    if script.endswith(".py"):
        return f"python {script}"
    if script in ("", "-", "-c"):  # an interactive session, stdin or -c
        return "python"
    return Path(script).name  # an installed console script (pytest)


def package_version() -> str:
    try:
        return importlib.metadata.version("cnnopt")
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown"


def git_commit(package_dir: Path) -> str | None:
    """HEAD's commit when `package_dir` is the package folder of a git checkout's root; None otherwise.

    A package installed into a virtual environment that sits inside some other repository is not that
    repository's code, so the checkout must hold the package at its root (`<root>/cnnopt`).
    """
    try:
        found = subprocess.run(["git", "-C", str(package_dir), "rev-parse", "--show-toplevel", "HEAD"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return None
    lines = found.stdout.split()
    if found.returncode != 0 or len(lines) != 2:
        return None
    root, commit = lines
    return commit if Path(root).resolve() == package_dir.resolve().parent else None


def split_digest(images, labels) -> str:
    """A short digest of a split: its shape, uint8 pixels and labels (a change to any changes it)."""
    pixels = np.ascontiguousarray(images.cpu().numpy())
    targets = np.ascontiguousarray(labels.cpu().numpy())
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps([list(pixels.shape), str(pixels.dtype), list(targets.shape)]).encode())
    digest.update(pixels.data)
    digest.update(targets.data)
    return digest.hexdigest()


def splits_digest(train_x, train_y, val_x, val_y) -> str:
    """A short digest of the train and val splits together (what a study selects on): an image added,
    removed, changed or relabelled in the folder changes it."""
    return hashlib.blake2b(f"{split_digest(train_x, train_y)}:{split_digest(val_x, val_y)}".encode(),
                           digest_size=8).hexdigest()


def duplicate_tags(copies: Counts | None) -> dict[str, str]:
    """Tags saying how many val and test images copied a train (test: or val) image, pixel for pixel, when
    the data loaded, whether the load left them out of the splits or they are in the scores, and how many
    images were found under two or more classes; {} where no load made the data.

    Args:
        copies: `ImageData.duplicates`: the load decided what was dropped, and its record says so.
    """
    if not copies:
        return {}
    return {"duplicate_val_images": str(copies.val), "duplicate_test_images": str(copies.test),
            "duplicates_dropped": str(copies.dropped).lower(), "conflicting_label_images": str(copies.conflicts)}


def train_dataset(config: DataConfig, images, labels) -> DatasetInput:
    """The train split as an MLflow dataset input: name, source, digest, schema and profile, context `train`.

    Args:
        config: the experiment's [data] table (the dataset's name and root).
        images, labels: the train split, uint8 `(N, C, H, W)` and int64 `(N,)` tensors.
    """
    import mlflow.data  # here: ~0.3 s of imports that only the driver needs
    from mlflow.data.code_dataset_source import CodeDatasetSource

    # from_numpy only reads the arrays' shapes and dtypes here (MLflow's schema and profile); the digest is ours.
    fields = mlflow.data.from_numpy(
        images.cpu().numpy(), targets=labels.cpu().numpy(), name=config.dataset, digest=split_digest(images, labels),
        source=CodeDatasetSource({"dataset": DIGITS_SOURCE, "loader": "sklearn.datasets.load_digits"})).to_dict()
    if config.dataset != "digits":  # a folder on this machine: MLflow's 'local' source type, by its path
        root = Path(config.root).expanduser().resolve()
        fields.update(source_type="local", source=json.dumps({"uri": str(root)}),
                      name=config.dataset if config.dataset == "cifar10" else root.name)
    return DatasetInput(Dataset(**fields), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "train")])


def log_dataset(client: MlflowClient, run_id: str, dataset: DatasetInput | None) -> None:
    """Record that the run trained on `dataset` (nothing when None)."""
    if dataset is not None:
        client.log_inputs(run_id, datasets=[dataset])
