"""Every experiment file runs end to end in a fast dev mode: 2 trials of 1 epoch, then promotion (CIFAR-10's tiny
offline copy is random pixels: its study ends refusing to register a model no better than the commonest class)."""

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
    extra = []
    if experiment.data.dataset == "cifar10":  # CIFAR-10 itself is not available offline: a tiny copy in its format
        extra = ["--set", f"data.root={write_cifar(tmp_path / 'data', per_batch=40).parent}"]
    # No --gpus-per-trial: every experiment file runs unchanged on this CPU-only cluster (GPUs where there are).
    code = search.main(["--experiment", str(path), "--trials", "2", "--concurrency", "2",
                        "--name", "dev", "--set", "train.epochs=1", "--set", "search.confirm_seeds=1", *extra])
    client = MlflowClient(tracking_uri=mlflow_store)
    if experiment.data.dataset == "cifar10":  # random pixels: nothing to learn, so nothing is registered
        err = capsys.readouterr().err
        assert code == 1 and "error: not promoted: run " in err and "retry" not in err, err
        assert not client.search_model_versions(f"name='{experiment.name}'")
        return
    assert code == 0
    champion = client.get_model_version_by_alias(experiment.name, "champion")
    assert "test_accuracy" in client.get_run(champion.run_id).data.metrics
