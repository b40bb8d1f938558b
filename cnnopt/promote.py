"""`python -m cnnopt.promote`: promote a study's best trial to a tested, exported, registered model.

The best trial by the experiment's validation metric is loaded from its best-epoch checkpoint
(`torch.load(..., weights_only=True)`), evaluated once on the test split (used for nothing else),
wrapped in a Predictor, exported to model.pt and model.pt2 (verified in a fresh torch-only process),
logged to the trial's MLflow run and registered under the experiment's name. The alias `champion`
moves to the new version only when its test accuracy is at least the current champion's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from cnnopt import tracking
from cnnopt.data.augment import Normalize
from cnnopt.training.checkpoint import FILENAME, load_checkpoint
from cnnopt.cli import add_experiment_args, quiet_libraries, run
from cnnopt.experiment.config import Experiment, load_experiment
from cnnopt.data.datasets import ImageData, load_data
from cnnopt.errors import UsageError
from cnnopt.deploy.export import export
from cnnopt.deploy.predictor import Predictor

ALIAS = "champion"
# uint8 images (N, C, H, W) of any size -> float32 probabilities (N, num_classes); stated, not inferred.
SIGNATURE = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
                           outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]))
SERVING_MODEL = Path(__file__).parent / "deploy" / "serving_model.py"


@dataclass
class Promotion:
    run_id: str
    test_accuracy: float
    test_loss: float
    per_class_accuracy: dict
    model_version: str
    champion: bool  # the alias moved to this version
    previous_champion: str | None
    files: dict


def best_trial_run(client, experiment: Experiment, study: str | None):
    """The study's completed trial with the best validation metric (the latest study when None)."""
    experiment_id = tracking.experiment_id(client, experiment.name)
    if study is None:
        parents = client.search_runs([experiment_id], "tags.`cnnopt.kind` = 'study'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise UsageError(f"the MLflow experiment {experiment.name!r} has no study to promote; "
                             "run python -m cnnopt.search first, or pass --run-id")
        study = parents[0].data.tags[tracking.STUDY_TAG]
    key = f"best_{experiment.metric}"
    order = "DESC" if experiment.mode == "max" else "ASC"
    runs = client.search_runs([experiment_id], f"tags.`{tracking.STUDY_TAG}` = '{study}' and "
                              f"tags.`cnnopt.kind` = 'trial' and tags.status = 'completed'",
                              order_by=[f"metrics.`{key}` {order}"], max_results=1)
    if not runs:
        raise UsageError(f"study {study!r} has no completed trial to promote")
    return runs[0]


@torch.no_grad()
def evaluate_test(model, data: ImageData) -> dict:
    """Loss, accuracy, per-class accuracy and the confusion matrix on the test split."""
    normalize = Normalize(data.mean, data.std, torch.device("cpu"))
    logits = torch.cat([model(normalize(data.test_x[i:i + 1024])) for i in range(0, len(data.test_y), 1024)])
    predictions = logits.argmax(1)
    confusion = torch.zeros(data.num_classes, data.num_classes, dtype=torch.long)
    confusion.index_put_((data.test_y, predictions), torch.ones_like(predictions), accumulate=True)
    per_class = confusion.diag().double() / confusion.sum(1).clamp_min(1)
    return {"test_loss": F.cross_entropy(logits, data.test_y).item(),
            "test_accuracy": (predictions == data.test_y).double().mean().item(),
            "per_class": {name: per_class[i].item() for i, name in enumerate(data.class_names)},
            "confusion": confusion}


def plot_confusion(confusion: torch.Tensor, class_names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(confusion.numpy(), cmap="Blues")
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), count in zip(torch.cartesian_prod(torch.arange(len(class_names)), torch.arange(len(class_names))).tolist(),
                                 confusion.flatten().tolist()):
        if count:
            axes.text(col, row, str(count), ha="center", va="center", fontsize=8)
    axes.set_title("test split confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def promote(experiment: Experiment, *, study: str | None = None, run_id: str | None = None) -> Promotion:
    """Evaluate, export, log and register the best trial (or the run `run_id`)."""
    client = tracking.make_client()
    try:
        run = client.get_run(run_id) if run_id else best_trial_run(client, experiment, study)
    except MlflowException:
        raise UsageError(f"no MLflow run {run_id!r} in {tracking.tracking_uri()}; check --run-id") from None
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        try:
            checkpoint_path = client.download_artifacts(run_id, f"checkpoint/{FILENAME}", str(scratch))
        except MlflowException:
            raise UsageError(f"run {run_id} has no checkpoint artifact to promote") from None
        model, checkpoint = load_checkpoint(checkpoint_path)
        data = load_data(experiment.data)
        trained = checkpoint["preprocessing"]
        # Same classes, size, channels and train-split statistics, or the "test" split may hold images the
        # trial trained or was selected on (another data.seed, fraction or subset gives other statistics).
        same = (trained["class_names"] == data.class_names and trained["image_size"] == data.image_size
                and trained["channels"] == data.channels
                and torch.allclose(torch.tensor(trained["mean"]), torch.tensor(data.mean), atol=1e-6)
                and torch.allclose(torch.tensor(trained["std"]), torch.tensor(data.std), atol=1e-6))
        if not same:
            raise UsageError(f"run {run_id} was trained on other data or another split than experiment "
                             f"{experiment.name!r} loads now; promote with the experiment file and --set values "
                             "the study ran with")
        if len(data.test_y) == 0:
            raise UsageError("the test split is empty; set data.test_fraction above 0")
        result = evaluate_test(model, data)  # the one use of the test split
        predictor = Predictor(model, trained)
        model_dir = scratch / "model"
        files = export(predictor, model_dir, data.test_x[:256])
        plot_confusion(result["confusion"], data.class_names, scratch / "confusion_matrix.png")
        (model_dir / "model_card.md").write_text(model_card(experiment, run, checkpoint, result))
        metrics = {"test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"],
                   **{f"test_accuracy_class_{name}": value for name, value in result["per_class"].items()}}
        tracking.log(client, run_id, metrics=metrics, tags={"promoted": "true"})
        client.log_artifact(run_id, str(scratch / "confusion_matrix.png"))
        client.log_artifacts(run_id, str(model_dir), artifact_path="exported")
        version, moved, previous = register(experiment, run_id, model_dir, result["test_accuracy"])
    parent = run.data.tags.get(tracking.PARENT_TAG)
    if parent:
        tracking.log(client, parent, metrics={"promoted_test_accuracy": result["test_accuracy"]},
                     tags={"promoted_run_id": run_id, "promoted_trial": run.data.tags.get("trial_number", ""),
                           "model_version": version})
    return Promotion(run_id, result["test_accuracy"], result["test_loss"], result["per_class"], version, moved,
                     previous, files)


def register(experiment: Experiment, run_id: str, model_dir: Path, test_accuracy: float):
    """Log the pyfunc model to the run, register it, and move `champion` if it is at least as good."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = tracking.make_client()
    status = client.get_run(run_id).info.status
    try:
        mlflow.start_run(run_id=run_id)
        info = mlflow.pyfunc.log_model(name="model", python_model=str(SERVING_MODEL),
                                       artifacts={name: str(model_dir / name) for name in
                                                  ("model.pt", "model.pt2", "model_card.md", "input_spec.json")
                                                  if (model_dir / name).exists()},
                                       pip_requirements=["torch", "numpy", "mlflow"], signature=SIGNATURE,
                                       input_example=_blank_example(model_dir))
    finally:  # reopening the trial's run must not change how it ended
        mlflow.end_run()
        client.set_terminated(run_id, status=status if status != "RUNNING" else tracking.FINISHED)
    version = mlflow.register_model(info.model_uri, experiment.name,
                                    tags={"test_accuracy": f"{test_accuracy:.6f}", "run_id": run_id}).version
    try:
        current = client.get_model_version_by_alias(experiment.name, ALIAS)
    except MlflowException:
        current = None
    previous = None if current is None else str(current.version)
    current_accuracy = None if current is None else float(current.tags.get("test_accuracy", "-1"))
    moved = current_accuracy is None or test_accuracy >= current_accuracy
    if moved:
        client.set_registered_model_alias(experiment.name, ALIAS, version)
    return str(version), moved, previous


def _blank_example(model_dir: Path) -> np.ndarray:
    """A blank image at the trained size: MLflow's input example (no test image leaves the split)."""
    spec_path = model_dir / "input_spec.json"
    spec = json.loads(spec_path.read_text()) if spec_path.exists() else {"channels_trained": 3, "image_size": 32}
    return np.zeros((1, spec["channels_trained"], spec["image_size"], spec["image_size"]), dtype=np.uint8)


def model_card(experiment: Experiment, run, checkpoint: dict, result: dict) -> str:
    params = run.data.params
    metrics = run.data.metrics
    searched = [n for n in run.data.tags.get("searched", "").split(",") if n]
    study = run.data.tags.get(tracking.STUDY_TAG, "")
    lines = [f"# {experiment.name}: {run.info.run_name}", "",
             f"Dataset: {experiment.data.dataset} ({checkpoint['preprocessing']['image_size']}px, "
             f"{checkpoint['preprocessing']['channels']} channel(s), classes {checkpoint['preprocessing']['class_names']})",
             f"Selected on: {experiment.metric} ({experiment.mode}) of the validation split; best epoch "
             f"{checkpoint.get('epoch')}", "",
             "## Metrics",
             f"- validation {experiment.metric}: {metrics.get('best_' + experiment.metric, float('nan')):.4f}",
             f"- test accuracy: {result['test_accuracy']:.4f} (test split used once, here)",
             f"- test loss: {result['test_loss']:.4f}", "",
             "## Hyperparameters"]
    lines += [f"- {name} = {params.get(name)}" + (" (searched)" if name in searched else "")
              for name in sorted(n for n in params if "." not in n)]
    lines += ["", "## Reproduce",
              f"python -m cnnopt.search --experiment {experiment.path} --name {study or 'NEW'}"
              f" --strategy {params.get('search.strategy', '<strategy>')}" if study else
              f"python -m cnnopt.train --experiment {experiment.path}",
              "", "## Use", "model.pt: torch.jit.load('model.pt')(uint8 images (N, C, H, W)) -> probabilities",
              f"model.pt2: torch.export.load('model.pt2').module() on images resized to "
              f"{checkpoint['preprocessing']['image_size']}x{checkpoint['preprocessing']['image_size']}"]
    return "\n".join(lines) + "\n"


def print_promotion(promotion: Promotion, experiment: Experiment) -> None:
    print(f"promoted run {promotion.run_id}: test_accuracy {promotion.test_accuracy:.4f}, "
          f"test_loss {promotion.test_loss:.4f} (test split evaluated once)")
    differences = promotion.files["max_difference"]
    print(f"  exported model.pt and model.pt2, verified in a fresh torch process "
          f"(max difference {max(differences.values()):.1e})")
    if promotion.champion:
        print(f"  registered {experiment.name} version {promotion.model_version}; alias '{ALIAS}' now points to it"
              + (f" (was version {promotion.previous_champion})" if promotion.previous_champion else ""))
    else:
        print(f"  registered {experiment.name} version {promotion.model_version}; alias '{ALIAS}' stays on version "
              f"{promotion.previous_champion}, whose test accuracy is higher")
    print(f"  predict with: python -m cnnopt.predict models:/{experiment.name}@{ALIAS} IMAGE...")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnopt.promote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--study", help="the study whose best trial to promote (default: the latest)")
    which.add_argument("--run-id", help="promote this MLflow run (a trial or a cnnopt.train run)")
    args = parser.parse_args(argv)
    quiet_libraries()
    experiment = load_experiment(args.experiment, args.overrides)
    print_promotion(promote(experiment, study=args.study, run_id=args.run_id), experiment)
    return 0


if __name__ == "__main__":
    run(main)
