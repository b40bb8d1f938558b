"""Every experiment file runs end to end in a fast dev mode: 2 trials of 1 epoch (3 on CIFAR-10's tiny offline copy,
whose classes are colours: its nets need a few steps), then promotion: tested, exported (CIFAR-10's with its flip
TTA), checked in a fresh process and registered."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_data import write_cifar

from cnnopt import search
from cnnopt.experiment.config import load_experiment

EXPERIMENTS = sorted((Path(__file__).resolve().parent.parent / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_file_runs_a_fast_dev_study(path, ray_session, mlflow_store, tmp_path, capsys):
    assert path.read_text().startswith("# python -m cnnopt."), "the first line is the command that runs it"
    experiment = load_experiment(path)
    extra = ["--set", "train.epochs=1"]
    if experiment.data.dataset == "cifar10":  # CIFAR-10 itself is not available offline: a tiny copy in its format
        # Learnable (random pixels left nothing to learn, so nothing was registered: its export went untested).
        root = write_cifar(tmp_path / "data", per_batch=150, learnable=True).parent
        extra = ["--set", f"data.root={root}", "--set", "train.epochs=3"]  # batch 128: 3 steps an epoch
    # No --gpus-per-trial: every experiment file runs unchanged on this CPU-only cluster (GPUs where there are).
    code = search.main(["--experiment", str(path), "--trials", "2", "--concurrency", "2",
                        "--name", "dev", "--set", "search.confirm_seeds=1", *extra])
    client = MlflowClient(tracking_uri=mlflow_store)
    assert code == 0, capsys.readouterr().err
    champion = client.get_model_version_by_alias(experiment.name, "champion")
    assert "test_accuracy" in client.get_run(champion.run_id).data.metrics
