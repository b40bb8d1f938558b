"""`python -m cnnopt.train`: one MLflow run that holds everything needed to reproduce it; errors for people."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnopt import lr_finder as lr_finder_cli
from cnnopt import train as train_cli
from cnnopt.errors import UsageError
from cnnopt.training.checkpoint import load_checkpoint
from cnnopt.cli import run
from cnnopt.experiment.config import DEFAULT_EXPERIMENT, TrainConfig, load_experiment

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds", "images_per_second")
FAST = ["--set", "train.epochs=2", "--set", "train.device=cpu"]


def only_run(uri: str, experiment: str = "digits"):
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def write_image_folder(root: Path, classes=("circle", "square"), per_class: int = 8) -> Path:
    for label, name in enumerate(classes):
        for index in range(per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("L", (10 + index, 10), 60 + 120 * label + index).save(root / name / f"{index}.png")
    return root


def test_train_records_one_reproducible_run(mlflow_store, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        run(train_cli.main, FAST + ["--run-name", "smoke"])
    assert caught.value.code == 0
    assert "completed: 2 epochs" in capsys.readouterr().out
    client, found = only_run(mlflow_store)
    assert found.info.status == "FINISHED" and found.info.run_name == "smoke"
    assert found.data.tags["status"] == "completed" and found.data.tags["cnnopt.kind"] == "train"

    # Every hyperparameter as a param under its declared name, as the experiment set it.
    params = found.data.params
    experiment = load_experiment(DEFAULT_EXPERIMENT, ["train.epochs=2", "train.device=cpu"])
    for field in dataclasses.fields(TrainConfig):
        assert params[field.name] == str(getattr(experiment.train, field.name)), field.name
    assert params["lr"] == "0.05" and params["batch_size"] == "64" and params["crop_padding"] == "1"
    assert params["data.dataset"] == "digits" and params["metric"] == "val_accuracy" and params["mode"] == "max"

    # Per-epoch metrics at step = epoch.
    for key in EPOCH_METRICS:
        history = client.get_metric_history(found.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
    val_accuracy = [m.value for m in sorted(client.get_metric_history(found.info.run_id, "val_accuracy"),
                                            key=lambda m: m.step)]
    metrics = found.data.metrics
    assert metrics["best_val_accuracy"] == max(val_accuracy)
    assert metrics["best_epoch"] == 1 + val_accuracy.index(max(val_accuracy))
    assert {f"best_{key}" for key in EPOCH_METRICS} <= set(metrics)
    assert metrics["num_parameters"] > 1000

    # The train split as MLflow's dataset input; the code version (tests/test_tracking.py checks the values).
    (dataset,) = found.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.source_type) == ("digits", "code")
    assert len(dataset.dataset.digest) == 16 and found.data.tags["mlflow.source.type"] == "LOCAL"
    assert found.data.tags["cnnopt.version"]

    # The experiment file and a checkpoint that rebuilds the best epoch's model.
    artifacts = {item.path for folder in ("experiment", "checkpoint")
                 for item in client.list_artifacts(found.info.run_id, folder)}
    assert artifacts == {"experiment/digits.toml", "checkpoint/checkpoint.pt"}
    stored = client.download_artifacts(found.info.run_id, "experiment/digits.toml", str(tmp_path))
    assert Path(stored).read_text() == DEFAULT_EXPERIMENT.read_text()
    path = client.download_artifacts(found.info.run_id, "checkpoint/checkpoint.pt", str(tmp_path))
    model, checkpoint = load_checkpoint(path)
    assert model.num_parameters == metrics["num_parameters"]
    assert checkpoint["epoch"] == metrics["best_epoch"] and checkpoint["config"] == experiment.train
    assert checkpoint["metrics"]["val_accuracy"] == metrics["best_val_accuracy"]
    assert checkpoint["preprocessing"]["class_names"] == [str(d) for d in range(10)]
    assert not model.training
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_a_diverged_run_fails_and_says_so(mlflow_store, capsys):
    with pytest.raises(SystemExit) as caught:
        run(train_cli.main, FAST + ["--set", "train.lr=1e6", "--set", "train.lr_schedule=none",
                                    "--set", "train.batch_norm=false"])
    assert caught.value.code == 1
    out = capsys.readouterr().out
    assert "lower train.lr" in out and "best epoch 0" not in out and "val_accuracy nan" not in out, out
    client, found = only_run(mlflow_store)
    assert found.info.status == "FAILED" and found.data.tags["status"] == "diverged"
    assert found.data.metrics["diverged"] == 1.0
    from cnnopt.deploy.promotion import promote
    from cnnopt.experiment.config import load_experiment

    with pytest.raises(UsageError, match=f"run {found.info.run_id} has no checkpoint artifact to promote; it diverged "
                                         "before any epoch could be kept: pass a run that completed"):
        promote(load_experiment(None), run_id=found.info.run_id)  # it said only "pass a run that trained"


def test_image_folder_end_to_end(mlflow_store, tmp_path):
    root = write_image_folder(tmp_path / "shapes")
    code = train_cli.main(FAST + ["--set", "name=shapes", "--set", "data.dataset=imagefolder",
                                  "--set", f"data.root={root}", "--set", "data.image_size=8",
                                  "--set", "train.batch_size=4", "--set", "data.val_fraction=0.25"])
    assert code == 0
    client, found = only_run(mlflow_store, "shapes")
    assert found.info.status == "FINISHED"
    assert found.data.params["data.dataset"] == "imagefolder" and found.data.params["data.root"] == str(root)
    (dataset,) = found.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.source_type) == ("shapes", "local")
    assert str(root) in dataset.dataset.source
    path = client.download_artifacts(found.info.run_id, "checkpoint/checkpoint.pt", str(tmp_path))
    model, checkpoint = load_checkpoint(path)
    assert checkpoint["preprocessing"]["class_names"] == ["circle", "square"]
    assert checkpoint["preprocessing"]["channels"] == 1 and checkpoint["preprocessing"]["image_size"] == 8


def test_class_names_mlflow_refuses_in_a_key_are_promoted_under_the_runs_experiment(mlflow_store, tmp_path, capsys):
    from cnnopt import promote as promote_cli

    root = write_image_folder(tmp_path / "pets", classes=("cat's", "dog (small)", "cat_s"))
    folder = ["--set", "name=pets", "--set", "data.dataset=imagefolder", "--set", f"data.root={root}",
              "--set", "data.image_size=8", "--set", "train.batch_size=4", "--set", "data.val_fraction=0.25",
              "--set", "data.test_fraction=0.25"]
    assert train_cli.main(FAST + folder) == 0
    client, found = only_run(mlflow_store, "pets")
    # The run's own recorded settings: no --set needed again, and the model card reproduces the run itself (it
    # named the promote command's settings: the default experiment, without the run's --set values).
    assert promote_cli.main(["--run-id", found.info.run_id]) == 0, capsys.readouterr().err
    assert f"promoted run {found.info.run_id} (a cnnopt.train run): test_accuracy" in capsys.readouterr().out
    card = Path(client.download_artifacts(found.info.run_id, "exported/model_card.md", str(tmp_path))).read_text()
    assert (f"## Reproduce\nOMP_NUM_THREADS={torch.get_num_threads()} python -m cnnopt.train --experiment "
            f"{DEFAULT_EXPERIMENT} {' '.join(FAST + folder)}\n") in card, card  # the CPU threads it trained with
    metrics = client.get_run(found.info.run_id).data.metrics
    assert {"test_accuracy_class_cat_s", "test_accuracy_class_dog _small_", "test_accuracy_class_cat_s_1"} <= set(metrics)
    # A run of no study is registered under its own experiment's name; another name given is refused.
    with pytest.raises(UsageError, match="belongs to MLflow experiment 'pets', not 'cats'"):
        promote_cli.main(["--run-id", found.info.run_id] + folder + ["--set", "name=cats"])
    assert [m.name for m in client.search_registered_models()] == ["pets"]


def test_a_run_with_no_test_split_is_warned_of_and_its_promotion_says_why(mlflow_store, capsys):
    """Promotion said "the test split is empty; set data.test_fraction above 0", and promoting with that --set
    was then refused as other data: the run could never be promoted, and nothing had said so when it trained."""
    from cnnopt import promote as promote_cli

    assert train_cli.main(FAST + ["--set", "data.test_fraction=0"]) == 0
    assert "warning: data.test_fraction = 0 leaves no test split: this run cannot be tested once" in capsys.readouterr().err
    _, found = only_run(mlflow_store)
    with pytest.raises(UsageError, match=rf"run {found.info.run_id} cannot be tested: data.test_fraction = 0 leaves no "
                                         r"test split \(the split it was trained with.*train it again once you set "
                                         r"data.test_fraction above 0"):
        promote_cli.main(["--run-id", found.info.run_id])


def empty_class_folder(tmp_path: Path) -> str:
    root = write_image_folder(tmp_path / "pets", per_class=2)
    (root / "empty").mkdir()
    return str(root)


BAD_INPUTS = {
    "unknown dataset": (lambda tmp: ["--set", "data.dataset=mnist"], "unknown dataset 'mnist'"),
    "missing cifar root": (lambda tmp: ["--set", "data.dataset=cifar10", "--set", f"data.root={tmp / 'none'}"],
                           "cifar-10-batches-py"),
    "missing image root": (lambda tmp: ["--set", "data.dataset=imagefolder", "--set", f"data.root={tmp / 'none'}"],
                           "image folder"),
    "empty class folder": (lambda tmp: ["--set", "data.dataset=imagefolder", "--set",
                                        f"data.root={empty_class_folder(tmp)}"], "empty holds no images"),
    "unknown --set key": (lambda tmp: ["--set", "train.learning_rate=0.1"], "unknown key 'learning_rate'"),
    "wrong-typed --set value": (lambda tmp: ["--set", "train.epochs=many"], "--set train.epochs must be int"),
    "impossible architecture": (lambda tmp: ["--set", "train.blocks=4"], "conv block 4 of 4"),
    "missing experiment file": (lambda tmp: ["--experiment", str(tmp / "none.toml")], "none.toml not found"),
    # Said after the data loaded and a run began: the run was left FAILED.
    **({} if torch.cuda.is_available() else
       {"cuda without a GPU": (lambda tmp: ["--set", "train.device=cuda"], "train.device = 'cuda' but no CUDA GPU")}),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_code_2(mlflow_store, tmp_path, capsys, name):
    make_args, fragment = BAD_INPUTS[name]
    with pytest.raises(SystemExit) as caught:
        run(train_cli.main, make_args(tmp_path))
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert fragment in err
    assert not (tmp_path / "mlflow.db").exists()  # rejected before any MLflow run exists


def test_module_rejects_bad_input_without_a_traceback(mlflow_store, tmp_path):
    done = subprocess.run([sys.executable, "-m", "cnnopt.train", "--set", "train.blocks=4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith("error: conv block 4 of 4") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr + done.stdout


def test_the_run_names_the_command_that_made_it(mlflow_store, tmp_path):
    """MLflow's Source column: the module run, as typed, when cnnopt.train runs as a program."""
    done = subprocess.run([sys.executable, "-m", "cnnopt.train", "--set", "train.epochs=1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    client, found = only_run(mlflow_store)
    assert found.data.tags["mlflow.source.name"] == "python -m cnnopt.train"
    assert found.data.tags["mlflow.source.type"] == "LOCAL"


@pytest.mark.parametrize("raised, ended", [(KeyboardInterrupt, ("KILLED", "interrupted", None)),
                                           (RuntimeError("out of memory"), ("FAILED", "failed", "out of memory"))])
def test_a_run_stopped_by_a_ctrl_c_or_an_error_says_so_in_its_status_tag(mlflow_store, raised, ended):
    """Ended KILLED or FAILED, as before, but with no `status` tag: a study's runs say interrupted or failed."""
    from cnnopt.tracking.runs import standalone_run

    with pytest.raises(type(raised) if isinstance(raised, Exception) else raised):
        with standalone_run(load_experiment(None), "stopped", "train") as record:
            raise raised
    run = MlflowClient(tracking_uri=mlflow_store).get_run(record.run_id)
    assert (run.info.status, run.data.tags.get("status"), run.data.tags.get("error")) == ended


def test_a_ctrl_c_keeps_the_best_epoch_so_far_and_it_can_be_promoted(mlflow_store, monkeypatch, capsys, tmp_path):
    """QA: a `cnnopt.train` run stopped by Ctrl-C after 5 of 300 epochs kept no checkpoint and no best_* metrics,
    so hours of training could be neither promoted nor used. Its best epoch so far is kept now; the run still
    ends KILLED, tagged interrupted, and the model card says it was interrupted."""
    from cnnopt import promote as promote_cli

    monkeypatch.chdir(tmp_path)
    real = train_cli.train

    def cut_at_epoch_3(config, data, report, **kwargs):
        def reporting(epoch, metrics):
            report(epoch, metrics)
            if epoch == 3:
                raise KeyboardInterrupt
        return real(config, data, reporting, **kwargs)

    monkeypatch.setattr(train_cli, "train", cut_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_cli.main(["--set", "train.epochs=8", "--set", "train.device=cpu"])
    client, found = only_run(mlflow_store)
    assert (found.info.status, found.data.tags["status"]) == ("KILLED", "interrupted")
    seen = [point.value for point in client.get_metric_history(found.info.run_id, "val_accuracy")]
    assert len(seen) == 3 and found.data.metrics["best_val_accuracy"] == max(seen)
    assert found.data.metrics["best_epoch"] == seen.index(max(seen)) + 1
    _, checkpoint = load_checkpoint(client.download_artifacts(found.info.run_id, "checkpoint/checkpoint.pt", str(tmp_path)))
    assert checkpoint["epoch"] == seen.index(max(seen)) + 1
    err = capsys.readouterr().err
    assert (f"interrupted: best epoch {checkpoint['epoch']} kept (val_accuracy {max(seen):.4f}) in MLflow run "
            f"{found.info.run_id}, ended KILLED; promote it with: python -m cnnopt.promote --run-id "
            f"{found.info.run_id}") in err, err
    assert promote_cli.main(["--run-id", found.info.run_id]) == 0
    card = Path(client.download_artifacts(found.info.run_id, "exported/model_card.md", str(tmp_path))).read_text()
    assert (f"best epoch {checkpoint['epoch']} of the epochs it ran before it was interrupted (of train.epochs = 8; "
            "the command below trains them all)") in card, card
    # Where the store fails as the best epoch is kept (often why one presses Ctrl-C), the run still ends KILLED,
    # interrupted, and the command says what was not kept (review: FAILED, with the store's traceback).
    from cnnopt.tracking.runs import Run

    def unreachable(*args, **kwargs):
        raise ConnectionError("artifact store unreachable")

    monkeypatch.setattr(Run, "log_artifact", unreachable)
    with pytest.raises(KeyboardInterrupt):
        train_cli.main(["--set", "train.epochs=8", "--set", "train.device=cpu", "--set", "name=cut"])
    _, stopped = only_run(mlflow_store, "cut")
    assert (stopped.info.status, stopped.data.tags["status"]) == ("KILLED", "interrupted")
    assert "could not be kept: artifact store unreachable" in capsys.readouterr().err


def test_a_store_that_cannot_be_used_is_said_before_the_data_is_decoded(tmp_path, monkeypatch, capsys):
    """A dead server was said only after the data loaded: a full decode of a big folder first."""
    from conftest import free_port

    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    root = write_image_folder(tmp_path / "pets", per_class=2)
    for module in (train_cli, lr_finder_cli):
        with pytest.raises(SystemExit) as caught:
            run(module.main, ["--set", "data.dataset=imagefolder", "--set", f"data.root={root}",
                              "--set", f"data.cache_dir={tmp_path / 'cache'}"])
        assert caught.value.code == 2
        assert f"the MLflow tracking server http://127.0.0.1:{port} does not answer" in capsys.readouterr().err
        assert not (tmp_path / "cache").exists(), "nothing decoded"
