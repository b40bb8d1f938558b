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


def test_the_test_pass_runs_on_the_gpu_and_agrees_with_the_cpu(digits_data):
    from cnnopt.deploy.promotion import evaluate_test
    from cnnopt.training.model import build_model

    model = build_model(TrainConfig(), digits_data.preprocessing())
    cpu = build_model(TrainConfig(), digits_data.preprocessing())
    cpu.load_state_dict(model.state_dict())
    moved, tf32 = [], []
    model.register_forward_pre_hook(lambda module, inputs: tf32.append(torch.backends.cudnn.allow_tf32))
    with pytest.MonkeyPatch.context() as patch:  # where the model was taken: the test must see the GPU used
        to = torch.nn.Module.to
        patch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(str(a[0]) if a else "") or to(self, *a, **k))
        on_gpu = evaluate_test(model, digits_data)
    assert moved and moved[0] == "cuda", moved
    assert tf32 and not any(tf32), "the test pass's convolutions run in fp32, not TF32"
    assert torch.backends.cudnn.allow_tf32, "cuDNN's TF32 setting is put back after the fp32 test pass"
    assert next(model.parameters()).device.type == "cpu", "handed back on the CPU, where export expects it"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        on_cpu = evaluate_test(cpu, digits_data)
    assert on_gpu["test_loss"] == pytest.approx(on_cpu["test_loss"], abs=1e-3)
    assert abs(on_gpu["test_accuracy"] - on_cpu["test_accuracy"]) <= 2 / len(digits_data.test_y)


def test_the_exported_model_resizes_on_the_gpu_as_on_the_cpu(digits_data, tmp_path):
    """model.pt on a GPU: images of another size are resized by the uint8 kernel (on the CPU) as in training."""
    from cnnopt.deploy.predictor import Predictor
    from cnnopt.training.model import build_model

    predictor = Predictor(build_model(TrainConfig(), digits_data.preprocessing()), digits_data.preprocessing()).eval()
    torch.jit.save(torch.jit.script(predictor), str(tmp_path / "model.pt"))
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    images = torch.randint(0, 256, (4, 3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_cpu = scripted(images)
        on_gpu = scripted.cuda()(images.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4)


def test_fractional_gpu_trials_share_one_gpu(mlflow_store, gpu_ray):
    experiment = load_experiment(None, ["train.epochs=2", "search.strategy=random", "search.trials=4",
                                        "search.gpus_per_trial=0.25", "search.cpus_per_trial=1"])
    outcome = run_study(experiment, StudyOptions(name="gpu-share"))
    assert outcome.counts == {"completed": 4}
    assert set(trials_devices("gpu-share")) == {"cuda"}, "a trial given a GPU trains on it"
    from cnnopt.analysis import load_trials
    from cnnopt.tracking import make_client

    client = make_client()  # shared, not one after another: some two trials' runs overlap in time
    spans = [(run.info.start_time, run.info.end_time) for run in
             (client.get_run(run_id) for run_id in load_trials("digits", "gpu-share")["run_id"])]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), spans


def test_by_default_a_study_packs_its_trials_on_the_gpu(mlflow_store, capsys, gpu_ray):
    experiment = load_experiment(None, ["train.epochs=1", "search.strategy=random", "search.trials=2"])
    assert experiment.search.gpus_per_trial == -1, "no flag: auto"
    run_study(experiment, StudyOptions(name="gpu-auto", header="study gpu-auto"))
    assert "study gpu-auto; trials on 1 GPU, 8 per GPU" in capsys.readouterr().out
    assert set(trials_devices("gpu-auto")) == {"cuda"}


def test_a_study_on_the_cpu_by_its_device_setting_holds_no_gpu_share(mlflow_store, capsys, gpu_ray):
    """train.device = cpu on a GPU cluster: its trials each held 1/8 of the GPU (8 at once on 16 CPUs, not 16),
    and the final training took the whole GPU."""
    experiment = load_experiment(None, ["train.epochs=1", "search.strategy=random", "search.trials=2",
                                        "train.device=cpu"])
    run_study(experiment, StudyOptions(name="gpu-cpu", header="study gpu-cpu"))
    assert "study gpu-cpu; trials on the CPU, 2 at once" in capsys.readouterr().out
    assert set(trials_devices("gpu-cpu")) == {"cpu"}
    from cnnopt.study.final import whole_node

    assert whole_node(False) == (4.0, 0.0) and whole_node(True) == (4.0, 1.0)


def trials_devices(study: str) -> list[str]:
    from cnnopt.analysis import load_trials
    from cnnopt.tracking import make_client

    client = make_client()
    return [client.get_run(run_id).data.tags["device"] for run_id in load_trials("digits", study)["run_id"]]


def test_splits_larger_than_the_runs_share_of_the_gpu_stay_on_the_host_and_train_there(digits_data):
    """8 trials on one GPU each copying a train split of more than an eighth of its memory all failed out of
    memory: a split over `DEVICE_DATA_SHARE` of the run's share stays on the host, a batch moved at a time."""
    from cnnopt.training.objective import held_on_device, set_up

    config = TrainConfig(epochs=5, device="cuda")
    whole = torch.cuda.get_device_properties(0).total_memory
    assert held_on_device(int(whole * 0.125 * 0.5), torch.device("cuda"), 0.125)
    assert not held_on_device(int(whole * 0.125 * 0.5) + 1, torch.device("cuda"), 0.125)
    assert set_up(config, digits_data).train_x.device.type == "cuda"
    held = set_up(config, digits_data, device_share=1e-9)
    assert held.streamed and held.train_x.device.type == "cpu" and held.batches_per_augment == 1
    result = train(config, digits_data, device_share=1e-9)
    assert result.status == "completed" and result.best_metrics["val_accuracy"] > 0.9
