"""GPU paths: CUDA training with mixed precision, and fractional GPUs per trial. Skipped without a GPU."""

from __future__ import annotations


import pytest
import torch

from cnnopt.experiment.config import TrainConfig, load_experiment
from cnnopt.training.objective import train
from cnnopt.study.runner import StudyOptions, run_study

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu: needs a CUDA GPU")]


def test_cuda_training_with_mixed_precision_learns(digits_data):
    result = train(TrainConfig(epochs=5, device="cuda"), digits_data)
    assert result.status == "completed" and result.best_metrics["val_accuracy"] > 0.9
    assert all(v.device.type == "cpu" for v in result.state_dict.values())  # best weights kept on the host


def test_fractional_gpu_trials_share_one_gpu(mlflow_store):
    import ray

    ray.shutdown()  # this test needs a Ray instance that sees the GPU
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        experiment = load_experiment(None, ["train.epochs=2", "search.strategy=random", "search.trials=4",
                                            "search.gpus_per_trial=0.25", "search.cpus_per_trial=1"])
        outcome = run_study(experiment, StudyOptions(name="gpu-share"))
        assert outcome.counts == {"completed": 4}
    finally:
        ray.shutdown()
