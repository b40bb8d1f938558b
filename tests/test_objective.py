"""The training objective on the real digits data: it learns, reports, diverges loudly and repeats itself."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cnnopt.experiment.config import TrainConfig, load_experiment
from cnnopt.errors import UsageError
from cnnopt.training import objective
from cnnopt.training.objective import OPTIMIZERS, SCHEDULES, TrainResult, epoch_seconds, is_better, train

REPORTED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds", "images_per_second",
            "epochs_planned")
DIGITS = dataclasses.replace(load_experiment().train, device="cpu")  # the default experiment's settings
QUICK = dataclasses.replace(DIGITS, epochs=1)  # for checks that only need it to run (~0.1 s an epoch)


def run(config: TrainConfig, data, **kwargs) -> tuple[TrainResult, list[tuple[int, dict]]]:
    reports: list[tuple[int, dict]] = []
    result = train(config, data, lambda epoch, metrics: reports.append((epoch, dict(metrics))), **kwargs)
    return result, reports


def test_a_short_digits_run_learns(digits_data):
    result, reports = run(dataclasses.replace(DIGITS, epochs=6), digits_data)
    assert result.status == "completed" and result.epochs_run == 6
    assert result.best_metrics["val_accuracy"] > 0.9  # chance is 0.1
    assert reports[-1][1]["train_loss"] < reports[0][1]["train_loss"]
    assert result.best_epoch == 1 + max(range(6), key=lambda i: (reports[i][1]["val_accuracy"], -i))
    assert result.best_metrics == reports[result.best_epoch - 1][1]
    assert result.history == [metrics for _, metrics in reports]
    assert result.num_parameters > 0 and result.state_dict is not None
    assert all(tensor.device.type == "cpu" for tensor in result.state_dict.values())


def test_report_gets_every_metric_every_epoch(digits_data):
    result, reports = run(dataclasses.replace(QUICK, epochs=3), digits_data)
    assert [epoch for epoch, _ in reports] == [1, 2, 3]
    for _, metrics in reports:
        assert set(metrics) == set(REPORTED)  # no 'diverged' key on a healthy epoch
        assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
        assert 0 <= metrics["train_accuracy"] <= 1 and 0 <= metrics["val_accuracy"] <= 1
        assert metrics["epoch_seconds"] > 0 and metrics["images_per_second"] > 0
    assert len(result.history) == 3


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains(digits_data, optimizer):
    lr = 0.05 if optimizer == "sgd" else 0.003
    result, reports = run(dataclasses.replace(QUICK, epochs=2, optimizer=optimizer, lr=lr), digits_data)
    assert result.status == "completed" and len(reports) == 2
    assert result.best_metrics["val_accuracy"] > 0.6  # chance is 0.1


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_lr_schedule_trains(digits_data, schedule):
    config = dataclasses.replace(QUICK, epochs=2, lr_schedule=schedule, step_size=1, gamma=0.5)
    result, reports = run(config, digits_data)
    assert result.status == "completed" and len(reports) == 2
    lrs = [metrics["lr"] for _, metrics in reports]  # the rate each epoch trained at (its last batch, for onecycle)
    if schedule in ("none", "step", "cosine"):
        assert lrs[0] == config.lr
    if schedule == "none":
        assert lrs[1] == config.lr
    elif schedule == "step":
        assert lrs[1] == pytest.approx(config.lr * 0.5)
    else:
        assert lrs[1] < lrs[0] <= config.lr


def test_a_diverging_lr_is_stopped_and_reported(digits_data):
    config = dataclasses.replace(QUICK, epochs=5, lr=1e6, lr_schedule="none", batch_norm=False)
    result, reports = run(config, digits_data)
    assert result.status == "diverged"
    assert result.epochs_run == len(reports) < 5  # stopped at the epoch that diverged
    epoch, metrics = reports[-1]
    assert metrics["diverged"] == 1.0
    assert not math.isfinite(metrics["train_loss"]) or not math.isfinite(metrics["val_loss"])
    assert result.best_epoch < epoch  # a diverged epoch is never the best


def test_same_seed_same_metrics(digits_data):
    config = dataclasses.replace(QUICK, epochs=2, crop_padding=1, flip=True, dropout=0.2, randaugment_ops=2)
    first, _ = run(config, digits_data)
    second, _ = run(config, digits_data)
    strip = lambda history: [{k: v for k, v in m.items() if k not in ("epoch_seconds", "images_per_second")}
                             for m in history]
    assert strip(first.history) == strip(second.history)
    for name, tensor in first.state_dict.items():
        assert torch.equal(tensor, second.state_dict[name]), name
    other, _ = run(dataclasses.replace(config, seed=1), digits_data)
    assert strip(other.history) != strip(first.history)


def test_bf16_runs_on_the_cpu(digits_data):
    result, reports = run(dataclasses.replace(QUICK, epochs=2, bf16=True, device="cpu"), digits_data)
    assert result.status == "completed"
    assert all(math.isfinite(metrics["val_loss"]) for _, metrics in reports)
    assert result.best_metrics["val_accuracy"] > 0.3
    assert all(tensor.dtype != torch.bfloat16 for tensor in result.state_dict.values())  # weights stay fp32


class Untouchable:
    """A split that fails any use: its length, an index, an attribute, a torch operation."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")

    def __getitem__(self, index):
        raise AssertionError("the test split was read (an index)")

    @classmethod
    def __torch_function__(cls, *args, **kwargs):
        raise AssertionError("the test split was read (a torch operation)")


def test_the_test_split_is_never_read(digits_data):
    """Training reads train and val only: a test split that fails any use leaves the run exactly as it was."""
    blind = dataclasses.replace(digits_data, test_x=Untouchable(), test_y=Untouchable())
    result, reports = run(dataclasses.replace(QUICK, epochs=2), blind)
    reference, expected = run(dataclasses.replace(QUICK, epochs=2), digits_data)
    timings = ("epoch_seconds", "images_per_second")
    learned = [{k: v for k, v in metrics.items() if k not in timings} for _, metrics in reports]
    assert learned == [{k: v for k, v in metrics.items() if k not in timings} for _, metrics in expected]
    assert result.best_epoch == reference.best_epoch and learned[-1]["val_accuracy"] > 0


def test_a_worker_refuses_data_that_holds_the_test_split(digits_data):
    """The driver sends trainings the data without its test split; a worker that got it anyway stops."""
    from cnnopt.study.trainable import check_no_test

    with pytest.raises(RuntimeError, match=r"test split \(269 images"):
        check_no_test(digits_data)
    withheld = digits_data.without_test()
    assert check_no_test(withheld) is withheld and len(withheld.test_y) == 0 and len(digits_data.test_y) == 269
    import pickle

    sent = pickle.loads(pickle.dumps(withheld))  # as Ray sends it: an empty view would carry the split's storage
    assert sent.test_x.untyped_storage().nbytes() == sent.test_y.untyped_storage().nbytes() == 0
    with pytest.raises(RuntimeError, match="0 images, 17216 bytes"):
        check_no_test(dataclasses.replace(digits_data, test_x=digits_data.test_x[:0],
                                          test_y=digits_data.test_y.new_empty((0,))))
    assert torch.equal(withheld.val_x, digits_data.val_x) and torch.equal(withheld.train_x, digits_data.train_x)


def test_metric_and_mode_choose_the_best_epoch(digits_data):
    result, reports = run(dataclasses.replace(QUICK, epochs=3), digits_data, metric="val_loss", mode="min")
    losses = [metrics["val_loss"] for _, metrics in reports]
    assert result.best_epoch == 1 + losses.index(min(losses))


def test_on_improve_is_called_before_the_report(digits_data):
    events = []
    train(dataclasses.replace(QUICK, epochs=2), digits_data, lambda epoch, _: events.append(("report", epoch)),
          on_improve=lambda epoch, state: events.append(("improve", epoch, isinstance(state, dict))))
    assert events[0] == ("improve", 1, True) and events[1] == ("report", 1)


def test_an_epochs_batches_are_of_equal_size_and_hold_every_image_once():
    """Cut at batch_size with the rest as a last batch, 5,000 images at 128 left a last batch of 8, whose
    BatchNorm statistics every checkpoint then carried (1-4 points of test accuracy on CIFAR-10 subsets)."""
    assert objective.batch_bounds(5000, 128) == [(125 * i, 125 * (i + 1)) for i in range(40)]
    for count, size in ((1259, 50), (4500, 128), (50000, 512), (129, 128), (7, 2), (3, 2), (2, 128), (300, 300)):
        bounds = objective.batch_bounds(count, size)
        sizes = [end - start for start, end in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == count and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 2, (count, size, sizes)
        assert max(sizes) <= size or min(sizes) < 4, "over the size only where batches of one would be left"
        assert len(bounds) == max(1, min(-(-count // size), count // 2)), "as few batches as the size allows"


def test_batches_augmented_together_train_as_batches_one_at_a_time(digits_data, monkeypatch):
    """On CUDA several batches go through the augmentation in one call (it is launch-bound there: 0.56x on an
    H100 at one batch a call); the model must learn from the same batches. Without augmentation, the same losses."""
    config = TrainConfig(epochs=2, channels=8, batch_size=50)  # 1,259 images: 26 batches of 48 or 49
    assert len(digits_data.train_y) % 50 and len(digits_data.train_y) // 50 % 4, "a partial batch and a partial chunk"
    one = train(config, digits_data)
    calls = []
    learn = objective.Setup.learn
    monkeypatch.setattr(objective, "_batches_per_augment", lambda *args: 4)
    monkeypatch.setattr(objective.Setup, "learn", lambda setup, x, y: calls.append(len(y)) or learn(setup, x, y))
    four = train(config, digits_data)
    assert sorted(set(calls)) == [48, 49] and len(calls) == 2 * 26 and sum(calls) == 2 * len(digits_data.train_y)
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [epoch[key] for epoch in four.history] == [epoch[key] for epoch in one.history], key
    augmented = dataclasses.replace(config, flip=True, crop_padding=2, randaugment_ops=2)
    first, again = train(augmented, digits_data), train(augmented, digits_data)
    assert first.status == "completed" and first.history[-1]["val_accuracy"] > 0.3  # chance: 0.1
    assert [epoch["train_loss"] for epoch in first.history] == [epoch["train_loss"] for epoch in again.history]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_lr_batch_makes_lr_a_rate_per_that_many_images(digits_data, optimizer):
    """With train.lr_batch, lr is the rate per lr_batch images: batch B trains at lr * B / lr_batch with SGD,
    lr * sqrt(B / lr_batch) with Adam and AdamW, the rate the optimizer and onecycle's peak take (the
    architecture space searches batch_size with lr so coupled)."""
    config = dataclasses.replace(QUICK, epochs=2, batch_size=64, lr=0.02, optimizer=optimizer)
    per_256 = 0.08 if optimizer == "sgd" else 0.04  # 64 of 256 images: a quarter of the rate, or its square root
    scaled = dataclasses.replace(config, lr=per_256, lr_batch=256)
    assert objective.learning_rate(scaled) == pytest.approx(0.02)
    assert objective.lr_setting(scaled, 0.02) == pytest.approx(per_256)
    assert objective.learning_rate(dataclasses.replace(scaled, lr_batch=0)) == per_256
    plain, _ = run(config, digits_data)
    coupled, _ = run(scaled, digits_data)
    for key in ("lr", "train_loss", "val_loss", "val_accuracy"):
        assert [m[key] for m in coupled.history] == [m[key] for m in plain.history], key
    onecycle = objective.make_schedule(scaled, objective.make_optimizer(scaled, [torch.nn.Parameter(torch.zeros(1))]), 5)
    assert onecycle.optimizer.param_groups[0]["max_lr"] == pytest.approx(0.02)
    uncoupled, _ = run(dataclasses.replace(scaled, lr_batch=0), digits_data)  # lr as given: another training
    assert [m["train_loss"] for m in uncoupled.history] != [m["train_loss"] for m in plain.history]


def test_sgd_momentum_is_the_middle_of_the_onecycle_cycle_and_changes_the_training(digits_data):
    """OneCycleLR's own 0.95-0.85 cycle overwrote train.momentum: momentum 0.8 and 0.99 trained identically
    under onecycle (the default), though the lesson space searches it."""
    def momenta(momentum: float) -> list[float]:
        config = dataclasses.replace(QUICK, optimizer="sgd", momentum=momentum, lr_schedule="onecycle", epochs=2)
        schedule = objective.make_schedule(config, objective.make_optimizer(config, [torch.nn.Parameter(torch.zeros(1))]), 10)
        seen = [schedule.optimizer.param_groups[0]["momentum"]]
        for _ in range(19):
            schedule.optimizer.step()
            schedule.step()
            seen.append(schedule.optimizer.param_groups[0]["momentum"])
        return seen

    seen = momenta(0.8)  # high while the rate is low, low at its peak
    assert seen[0] == pytest.approx(0.85) and min(seen) == pytest.approx(0.75, abs=1e-3) and max(seen) == pytest.approx(0.85)
    default = momenta(TrainConfig().momentum)
    assert (max(default), min(default)) == (pytest.approx(0.95), pytest.approx(0.85, abs=1e-3)), "Smith's, as before"
    assert max(momenta(0.99)) == pytest.approx(0.999), "below 1"
    assert set(momenta(0.0)) == {0.0}, "plain SGD stays plain"
    low, _ = run(dataclasses.replace(QUICK, epochs=2, optimizer="sgd", momentum=0.8, lr_schedule="onecycle"), digits_data)
    high, _ = run(dataclasses.replace(QUICK, epochs=2, optimizer="sgd", momentum=0.99, lr_schedule="onecycle"), digits_data)
    assert [m["val_loss"] for m in low.history] != [m["val_loss"] for m in high.history]


def test_a_cosine_schedule_respanned_mid_training_is_the_cosine_of_its_new_length():
    """A re-plan (a deadline's, or grow's) built the new CosineAnnealingLR from the rate already decayed, so its
    decay compounded on the old one (0.0549 against 0.0691 going from 10 to 8 epochs after 3)."""
    config = dataclasses.replace(QUICK, optimizer="sgd", lr=0.1, lr_schedule="cosine", epochs=10, lr_batch=0)
    optimizer = objective.make_optimizer(config, [torch.nn.Parameter(torch.zeros(1))])
    schedule = objective.make_schedule(config, optimizer, 5)
    for _ in range(3):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * 3 / 10)))
    schedule = objective._respan(config, optimizer, schedule, 8, 15, 5, 3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * 3 / 8)))
    for epoch in (4, 5):
        optimizer.step()
        schedule.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * epoch / 8)))
    schedule = objective._respan(config, optimizer, schedule, 12, 25, 5, 5)  # grown again: the same rule
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * 5 / 12)))


def test_augmentation_and_every_option_together(digits_data):
    config = dataclasses.replace(QUICK, epochs=1, flip=True, crop_padding=1, affine_degrees=10.0,
                                 jitter_brightness=0.2, randaugment_ops=1, label_smoothing=0.1,
                                 head_batch_norm=True, channels_last=False, batch_size=100)
    result, _ = run(config, digits_data)
    assert result.status == "completed"


@pytest.mark.parametrize("settings,fragment", [
    ({"optimizer": "rmsprop"}, "train.optimizer"),
    ({"lr_schedule": "linear"}, "train.lr_schedule"),
    ({"epochs": 0}, "train.epochs"),
    ({"batch_size": 1}, "train.batch_size"),
    ({"lr": 0.0}, "train.lr"),
    ({"crop_padding": 1, "crop_padding_mode": "zeros"}, "train.crop_padding_mode"),
    ({"crop_padding": 8, "crop_padding_mode": "reflect"}, "train.crop_padding"),
    ({"randaugment_ops": 2, "randaugment_magnitude": 31}, "train.randaugment_magnitude"),
    ({"randaugment_ops": -1}, "train.randaugment_ops"),
])
def test_bad_settings_are_usage_errors(digits_data, settings, fragment):
    with pytest.raises(UsageError, match=fragment):
        train(dataclasses.replace(QUICK, **settings), digits_data)


def test_unavailable_cuda_is_a_usage_error(digits_data):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    with pytest.raises(UsageError, match="no CUDA GPU"):
        train(dataclasses.replace(QUICK, device="cuda"), digits_data)


def test_is_better():
    assert is_better(0.5, None, "max") and not is_better(float("nan"), None, "max")
    assert is_better(0.6, 0.5, "max") and not is_better(0.6, 0.5, "min")
    assert not is_better(float("nan"), 0.5, "max") and not is_better(float("nan"), 0.5, "min")


def test_an_epoch_counts_the_mirror_where_tta_predicts_it(digits_data):
    plain = epoch_seconds(1e-3, digits_data, TrainConfig())
    mirrored = epoch_seconds(1e-3, digits_data, TrainConfig(tta="flip"))
    assert plain == pytest.approx(1e-3 * (len(digits_data.train_y) + len(digits_data.val_y) / 3))
    assert mirrored - plain == pytest.approx(1e-3 * len(digits_data.val_y) / 3), "val is predicted twice"


def test_a_cutout_as_big_as_the_image_is_refused_before_training():
    from cnnopt.training.objective import check_config

    check_config(TrainConfig(cutout=31), 32)
    with pytest.raises(UsageError, match="train.cutout = 32 must be below the 32-pixel image side.*a quarter of it, 8"):
        check_config(TrainConfig(cutout=32), 32)


@pytest.mark.parametrize("device", ["gpu", "xpu", "CPU", "", "cuda:x"])
def test_a_device_torch_would_refuse_is_one_line(device):
    """torch's RuntimeError ("Expected one of cpu, cuda, ...") was a traceback in cnnopt.train, and inside Ray it
    failed every trial of a study."""
    with pytest.raises(UsageError, match=rf"train.device = {device!r} is not one of auto, cpu, cuda, cuda:N, mps"):
        objective.check_choices(dataclasses.replace(QUICK, device=device))
    with pytest.raises(UsageError, match="is not one of auto, cpu, cuda, cuda:N, mps"):
        objective.resolve_device(device)


def test_a_cuda_index_past_the_machines_gpus_is_one_line(monkeypatch):
    """cuda:3 on a one-GPU machine passed (only is_available was asked) and failed in torch with a traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert objective.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UsageError, match=r"^train.device = 'cuda:3' but this machine shows 1 CUDA GPU \(cuda:0\); "
                                         "name one of those, or use train.device=cuda$"):
        objective.resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match=r"shows 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        objective.resolve_device("cuda:2")


def test_mps_is_taken_where_torch_has_it_and_one_line_where_not():
    if torch.backends.mps.is_available():
        assert objective.resolve_device("mps").type == "mps"
    else:
        with pytest.raises(UsageError, match="train.device = 'mps' but this machine's torch has no Apple GPU"):
            objective.check_choices(dataclasses.replace(QUICK, device="mps"))


def test_a_ray_task_knows_its_share_of_a_gpu_and_its_splits_stay_on_a_cpu(gpu_ray, digits_data):
    """`gpu_share` is what `held_on_device` divides a GPU's memory by: Ray's fractional share, read in the
    task (here of a GPU Ray is told of: no CUDA is touched); 1 for none or a whole GPU. On the CPU the
    splits are where they are, whatever the share."""
    from cnnopt.study.trainable import gpu_share
    from cnnopt.training.objective import held_on_device, set_up

    shares = [gpu_ray.get(gpu_ray.remote(num_cpus=1, num_gpus=gpus)(gpu_share).remote()) for gpus in (0.25, 0, 1)]
    assert shares == [0.25, 1.0, 1.0]
    assert held_on_device(2**60, torch.device("cpu"), 1e-9)
    setup = set_up(TrainConfig(epochs=1, device="cpu"), digits_data, device_share=1e-9)
    assert not setup.streamed and setup.train_x.data_ptr() == digits_data.train_x.data_ptr()
