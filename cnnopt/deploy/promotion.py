"""Promotion: a trial's best-epoch checkpoint evaluated once on the test split, exported and registered.

The best trial by the experiment's validation metric is loaded from its best-epoch checkpoint
(`torch.load(..., weights_only=True)`), evaluated once on the test split (used for nothing else),
wrapped in a Predictor, exported to model.pt and model.pt2 (verified in a fresh torch-only process),
logged to the trial's MLflow run and registered under the experiment's name. The alias `champion`
moves to the new version unless the current champion's validation score, on the same metric and val
split, is better (`registry.register`): the test split chooses nothing. A study's test split is read
once: another of its runs is promoted only on purpose (`retest`), and the count of reads is said.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException

from cnnopt import tracking
from cnnopt.data.augment import Normalize
from cnnopt.data.datasets import ImageData, load_data, why_no_test
from cnnopt.deploy.export import exported
from cnnopt.deploy.predictor import Predictor
from cnnopt.cli import counted
from cnnopt.errors import UsageError
from cnnopt.experiment.config import Experiment, check_name, with_overrides
from cnnopt.tracking import registry, studies
from cnnopt.tracking.store import missing_artifacts
from cnnopt.training.checkpoint import FILENAME, load_checkpoint
from cnnopt.training.objective import uses_cuda


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
    name: str  # the registered model's name: the experiment the run belongs to
    reason: str = ""  # why the alias stayed on the previous champion, or moved without a comparison
    again: bool = False  # the run was promoted before: its test split was evaluated once more
    test_reads: int = 0  # how many times its study's test split has now been read (0: the run is in no study)
    study: str = ""
    source: str = ""  # what the run is (`source_of`): a plain `cnnopt.promote` named nothing and said nothing of it


def source_of(run) -> str:
    """What a promoted run is, in words: "study 's', trial 7", "study 's', the final training of trial 7",
    "study 's', trial 7's configuration with seed 2", or "a cnnopt.train run"."""
    tags = run.data.tags
    kind, study = tags.get(tracking.KIND_TAG, ""), tags.get(tracking.STUDY_TAG, "")
    what = {"trial": f"trial {tags.get('trial_number', '?')}",
            studies.FINAL: f"the final training of trial {tags.get('trains_trial', '?')}'s configuration",
            studies.CONFIRMATION: f"trial {tags.get('confirms_trial', '?')}'s configuration with seed {tags.get('seed', '?')}",
            }.get(kind)
    if study and what:
        return f"study {study!r}, {what}"
    return f"a cnnopt.{kind} run" if kind else "a run of no study"


def best_trial_run(client, experiment: Experiment, study: str | None):
    """The study's best completed trial by the validation metric (the latest study when None); on a tie,
    the lowest trial number, as the study itself picks (`cnnopt.trials.best`)."""
    parent = studies.find_parent(client, study, experiment.name)
    if parent is None and study is not None:  # a study named on its own, of another experiment file
        parent = studies.find_parent(client, study)
    if parent is None:
        if study is None:
            raise UsageError(f"the MLflow experiment {experiment.name!r} has no study to promote; "
                             "run python -m cnnopt.search first, or pass --run-id")
        raise UsageError(f"the MLflow experiment {experiment.name!r} holds no study named {study!r}; check --study")
    chosen_by = studies.settings_of(client, parent.info.run_id) or experiment  # the study's own metric and mode
    run = studies.best_trial_run(studies.trial_runs(client, parent), chosen_by.metric, chosen_by.mode)
    if run is None:
        raise UsageError(f"study {parent.data.tags[tracking.STUDY_TAG]!r} has no completed trial to promote")
    return run


@torch.no_grad()
def evaluate_test(model, data: ImageData, device: str = "auto") -> dict:
    """Loss, accuracy, per-class accuracy and the confusion matrix on the test split (in eval mode), on the GPU
    where there is one and train.device (`device`) does not name the CPU or an Apple GPU (the model is handed back
    on the CPU, where export expects it)."""
    wanted, device = device, torch.device("cpu")  # a VGG's 10,000 images: ~15 s on 2 cores
    if torch.cuda.is_available() and uses_cuda(wanted):  # cnnopt.train's cuda:1 where this machine has it
        numbered = wanted.startswith("cuda:") and int(wanted[5:]) < torch.cuda.device_count()
        device = torch.device(wanted if numbered else "cuda")
    model.eval().to(device)
    normalize = Normalize(data.mean, data.std, device)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, as on the CPU (cuDNN's default is TF32 on Ampere+)
    try:
        logits = torch.cat([model(normalize(data.test_x[i:i + 1024].to(device))).cpu()
                            for i in range(0, len(data.test_y), 1024)])
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        model.cpu()
    predictions = logits.argmax(1)
    confusion = torch.zeros(data.num_classes, data.num_classes, dtype=torch.long)
    confusion.index_put_((data.test_y, predictions), torch.ones_like(predictions), accumulate=True)
    counts = confusion.sum(1)
    per_class = confusion.diag().double() / counts.clamp_min(1)
    return {"test_loss": F.cross_entropy(logits, data.test_y).item(),
            "test_accuracy": (predictions == data.test_y).double().mean().item(),
            # A class with no test image has no accuracy (it read 0.0, as if every one were wrong): left out.
            "per_class": {name: per_class[i].item() for i, name in enumerate(data.class_names) if counts[i]},
            "confusion": confusion}


def plot_confusion(confusion: torch.Tensor, class_names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(confusion.numpy(), cmap="Blues")
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), count in zip(torch.cartesian_prod(torch.arange(len(class_names)), torch.arange(len(class_names))).tolist(),
                                 confusion.flatten().tolist()):
        if count:  # white on the dark cells (the diagonal, mostly), where black could not be read
            dark = image.norm(count) > 0.5
            axes.text(col, row, str(count), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    axes.set_title("test split confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def promote(experiment: Experiment, *, study: str | None = None, run_id: str | None = None,
            overrides: tuple[str, ...] | list[str] = (), retest: bool = False) -> Promotion:
    """Evaluate, export, log and register the best trial (or the run `run_id`) as it was recorded: the data
    it trained on, the metric and the registered name come from the settings its study (or, for a
    `cnnopt.train` run, the run itself) recorded (`studies.trained_settings`), with `overrides` on top (the
    data's folder on this machine, say); from `experiment` (its file and overrides) for a run that recorded
    none. `experiment` also says where to look for `study` (its MLflow experiment first, then any).
    A run of a study that promoted another run already is refused unless `retest`: its test split would
    be read again, and a choice between the two by test accuracy would make the figure optimistic."""
    client = tracking.make_client()
    try:
        run = client.get_run(run_id) if run_id else best_trial_run(client, experiment, study)
    except MlflowException:
        raise UsageError(f"no MLflow run {run_id!r} in {tracking.tracking_uri()}; check --run-id") from None
    parent_id = run.data.tags.get(tracking.PARENT_TAG)
    parent_tags = client.get_run(parent_id).data.tags if parent_id else {}
    promoted, study_name = parent_tags.get("promoted_run_id"), run.data.tags.get(tracking.STUDY_TAG, "")
    if run_id is None and promoted:  # a study promotes once: its test split is not read again unless a run is named
        raise UsageError(f"study {study_name!r} promoted run {promoted} already, and its test split is read once; "
                         f"to evaluate and register a run again, name it: python -m cnnopt.promote --run-id {promoted}")
    if promoted and promoted != run.info.run_id and not retest:
        raise UsageError(f"study {study_name!r} promoted run {promoted} already, and its test split is read once: "
                         f"promoting run {run.info.run_id} too would read it again, and choosing between the two by "
                         "test accuracy would make the figure optimistic; to do it anyway, add --retest (the output "
                         "and the model card then say how many times the test split was read)")
    reads = int(parent_tags.get("test_reads", "1" if promoted else "0")) + 1 if parent_id else 0
    again = run.data.tags.get("promoted") == "true"  # named by --run-id: evaluated again, and said so
    recorded = studies.trained_settings(client, run)
    settings = with_overrides(recorded, overrides) if recorded else experiment
    check_name(settings.name)  # it names the registered model: said before the test split is read
    run_id = run.info.run_id
    own = client.get_experiment(run.info.experiment_id).name
    if own != settings.name:  # the registered model is named after the run's experiment (--set name=... too)
        raise UsageError(f"run {run_id} belongs to MLflow experiment {own!r}, not {settings.name!r}: promote it "
                         "with the experiment file it was trained with, without --set name (its experiment's "
                         "name names the registered model)")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        try:
            checkpoint_path = client.download_artifacts(run_id, f"checkpoint/{FILENAME}", str(scratch))
        except MlflowException:
            kind, status = run.data.tags.get(tracking.KIND_TAG, ""), run.data.tags.get("status", "")
            ended = {"diverged": "it diverged before any epoch could be kept",
                     "failed": "it failed before any epoch could be kept",
                     "interrupted": "it was interrupted before its checkpoint was saved"}.get(status)
            hint = (f"it is study {run.data.tags.get(tracking.STUDY_TAG, '')!r}'s parent run: promote the study "
                    f"with --study {run.data.tags.get(tracking.STUDY_TAG, '')}" if kind == "study"
                    else f"{ended}: pass a run that completed" if ended
                    else "pass a run that trained (a trial, a confirmation seed, a final training or a "
                         "cnnopt.train run)")
            missing = missing_artifacts(run.info.artifact_uri)
            raise UsageError(f"run {run_id} has no checkpoint artifact to promote{missing}; "
                             + ("restore the artifact folder, or promote a run whose files are there" if missing
                                else hint)) from None
        model, checkpoint = load_checkpoint(checkpoint_path)
        data = load_data(settings.data)
        trained = checkpoint["preprocessing"]
        # Same classes, size, channels and train-split statistics, or the "test" split may hold images the
        # trial trained or was selected on (another data.seed, fraction or subset gives other statistics).
        same = (trained["class_names"] == data.class_names and trained["image_size"] == data.image_size
                and trained["channels"] == data.channels
                and torch.allclose(torch.tensor(trained["mean"]), torch.tensor(data.mean), atol=1e-6)
                and torch.allclose(torch.tensor(trained["std"]), torch.tensor(data.std), atol=1e-6))
        if not same:
            if recorded and not overrides:
                raise UsageError(f"run {run_id} was trained on other images than its recorded settings load now "
                                 "(class names, size, channels or the train split's statistics differ): the folder "
                                 "changed since, or holds other images on this machine; restore the images it "
                                 "trained on, or point --set data.root=... at them")
            where = "its recorded settings load" if recorded else f"experiment {experiment.name!r} loads"
            raise UsageError(f"run {run_id} was trained on other data or another split than {where} now"
                             f"{' with the --set values given' if recorded else ''}; promote with "
                             "the --set values it was trained with")
        check_learnt(run, settings, data)
        if why := why_no_test(settings.data, data):  # the same split the run trained beside: it had no test images
            raise UsageError(f"run {run_id} cannot be tested: {why[0]} (the split it was trained with, which a "
                             f"promotion keeps); train it again once you {why[1]}")
        model_dir = scratch / "model"
        # The exported files are checked in a fresh process while the test pass runs; registering waits for it.
        with exported(Predictor(model, trained), model_dir, data.test_x[:256]) as files:
            result = evaluate_test(model, data, settings.train.device)  # the one use of the test split
            plot_confusion(result["confusion"], data.class_names, scratch / "confusion_matrix.png")
            (model_dir / "model_card.md").write_text(model_card(settings, run, checkpoint, result, reads, again))
        metrics = {"test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"],
                   **tracking.per_name_metrics("test_accuracy_class_", result["per_class"])}
        registered = registry.record_promotion(settings, run, metrics, scratch / "confusion_matrix.png", model_dir,
                                               tracking.split_digest(data.test_x, data.test_y),
                                               tracking.split_digest(data.val_x, data.val_y), reads,
                                               tracking.duplicate_tags(data.duplicates))
    return Promotion(run_id, result["test_accuracy"], result["test_loss"], result["per_class"], registered.version,
                     registered.moved, registered.previous, files, settings.name, registered.reason, again,
                     reads, study_name, source_of(run))


class NotLearnt(UsageError):
    """A run no better than always answering the commonest class: promoting it again would refuse again."""


def check_learnt(run, settings: Experiment, data: ImageData) -> None:
    """A run selected on val accuracy no better than always answering the val split's commonest class learnt
    nothing: it is not tested or registered (a study under load finished 1 trial of ~11 planned, at 0.1041 on
    digits, exactly that share, and registered it as champion, exit 0)."""
    score = run.data.metrics.get(f"best_{settings.metric}")
    if settings.metric != "val_accuracy" or score is None or not len(data.val_y):
        return
    commonest = float(torch.bincount(data.val_y.long()).max()) / len(data.val_y)
    if score <= commonest:
        raise NotLearnt(f"run {run.info.run_id}'s val_accuracy {score:.4f} is no better than always answering the "
                         f"commonest class ({commonest:.4f} of the val split): it learnt nothing worth registering, so "
                         "it is not tested or promoted; give the study more time or epochs (its trial lines show "
                         "what each reached)")


def confirmed_lines(run, metric: str) -> list[str]:
    """The model card's line on its configuration's confirmation: a figure with less selection in it than the
    run's own best epoch (the best of its study's trials, and of their epochs)."""
    found = studies.confirmation_of(tracking.make_client(), run)
    if found is None:
        return []
    if found.seeds == 1:
        return [f"- confirmed: trial {found.trial}'s configuration scored {metric} {found.mean:.4f} with 1 new seed "
                "(one seed: no spread measured)"]
    return [f"- confirmed: trial {found.trial}'s configuration scored {metric} {found.mean:.4f} ± {found.std:.4f} "
            f"over {found.seeds} new seeds (mean ± standard deviation of their best epochs, at its trial's length: "
            "one run's best is luckier)"]


def reproduce_lines(settings: Experiment, checkpoint: dict, study: str, final_data: str | None) -> list[str]:
    """The card's commands: for a study's model, its configuration and seed trained again alone (the settings
    with what the checkpoint's training changed of them: the searched values, the seed, a final's epochs), then
    the study that chose it; the card gave only the study's command, which does not rebuild this model (the
    trial it chooses varies from run to run). A cnnopt.train run's own command."""
    base = dataclasses.asdict(settings.train)
    trained = checkpoint.get("train_config") or {}
    changed = [f"--set train.{name}={value}" for name, value in trained.items()
               if name in base and name != "device" and value != base[name]]
    # cnnopt.train reads no [search] setting (a time budget's, say); a time budget's trial trained on the
    # stratified train subset its plan set (of the user's data.subset, where one was given): no override holds it.
    own = [item for item in settings.overrides
           if not item.strip().startswith("search.") and item.partition("=")[0].strip() != "data.subset"]
    if settings.data.subset:
        own.append(f"data.subset={settings.data.subset}")
    # A CPU's sums depend on how many threads split them (`objective.cpu_threads`): the same threads, the same model.
    threads = checkpoint.get("threads") or 0  # 0: trained on a GPU, or recorded before the threads were
    if threads and settings.train.device != "cpu":  # `auto` on a machine with a GPU would train there (review)
        changed.append("--set train.device=cpu")
    alone = " ".join([f"OMP_NUM_THREADS={threads}"] * bool(threads)
                     + [dataclasses.replace(settings, overrides=tuple(own)).command_line("python -m cnnopt.train"),
                        *changed])
    if not study:
        return [alone]
    where = ("" if final_data in (None, "train") else
             f" (this model trained on {final_data}; cnnopt.train trains on the train split)")
    threads_note = f", on the CPU with the {threads} thread{'s' * (threads != 1)} it trained with" if threads else ""
    return [f"This configuration and seed, trained again alone{threads_note}{where}:", alone, "",
            "The study that chose it (its choice varies from run to run):",
            settings.command_line("python -m cnnopt.search")]


def model_card(settings: Experiment, run, checkpoint: dict, result: dict, test_reads: int = 1,
               again: bool = False) -> str:
    """The model card: data, selection, metrics, hyperparameters, and the command that reproduces the run
    (from the study's recorded `settings`: its experiment file and every override)."""
    params = run.data.params
    metrics = run.data.metrics
    searched = [n for n in run.data.tags.get("searched", "").split(",") if n]
    study = run.data.tags.get(tracking.STUDY_TAG, "")
    split = "train" if settings.metric.startswith("train_") else "validation"  # train_*: selected on training data
    score = metrics.get(f"best_{settings.metric}")
    last = run.data.tags.get("kept_epoch") == "last"  # a final training: its last epoch, where its schedule ends
    # A study's final training: its epoch is not selected, but its configuration was, by the study's search.
    chose = (f"Selected on: {settings.metric} ({settings.mode}) of the {split} split, by the study that chose "
             f"trial {run.data.tags['trains_trial']}'s configuration; this model is that configuration's final training"
             if study and run.data.tags.get("trains_trial") else "Selected on: nothing")
    if last and score is not None and split == "validation":  # on the train split: scored on val, not selected by it
        selected = (f"{chose}; trained on {run.data.tags.get('final_data', 'its data')}, its last epoch "
                    f"({checkpoint.get('epoch')}) kept, where its schedule ends")
        shown = [f"- validation {settings.metric} at that epoch: {score:.4f}"]
    elif last or score is None:  # a train+val final: nothing left to select on, or to score on
        selected = (f"{chose}; trained on {run.data.tags.get('final_data', 'its data')}, its last epoch "
                    f"({checkpoint.get('epoch')}) kept")
        shown = []
    else:
        selected = f"Selected on: {settings.metric} ({settings.mode}) of the {split} split; best epoch {checkpoint.get('epoch')}"
        shown = [f"- {split} {settings.metric}: {score:.4f}"]
    if run.data.tags.get("status") == "interrupted":  # a cnnopt.train run stopped by hand keeps its best epoch so far
        selected += (f" of the epochs it ran before it was interrupted (of train.epochs = {settings.train.epochs}; "
                     "the command below trains them all)")
    shown += confirmed_lines(run, settings.metric)
    lines = [f"# {settings.name}: {run.info.run_name}", "",
             f"Dataset: {settings.data.dataset} ({checkpoint['preprocessing']['image_size']}px, "
             f"{counted(checkpoint['preprocessing']['channels'], 'channel')}, classes {checkpoint['preprocessing']['class_names']})",
             selected, "",
             "## Metrics", *shown,
             f"- test accuracy: {result['test_accuracy']:.4f} "
             + ("(test split evaluated again: this run was promoted before)" if again and test_reads <= 1 else
                f"(the study's test split read {test_reads} times, by as many promotions: a choice among their "
                "models by test accuracy would make this figure optimistic)" if test_reads > 1 else
                "(test split used once, here)"),
             f"- test loss: {result['test_loss']:.4f}", "",
             "## Hyperparameters"]
    lines += [f"- {name} = {params.get(name)}" + (" (searched)" if name in searched else "")
              for name in sorted(n for n in params if "." not in n)]
    lines += ["", "## Reproduce", *reproduce_lines(settings, checkpoint, study, run.data.tags.get("final_data")),
              "", "## Use", "model.pt: torch.jit.load('model.pt')(uint8 images (N, C, H, W)) -> probabilities",
              f"model.pt2: torch.export.load('model.pt2').module() on images resized to "
              f"{checkpoint['preprocessing']['image_size']}x{checkpoint['preprocessing']['image_size']}"]
    return "\n".join(lines) + "\n"
