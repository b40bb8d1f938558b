"""`python -m cnnopt.lr_finder`: the learning-rate range test (Leslie Smith, as fastai runs it).

A fresh model trains for a few hundred mini-batches while the learning rate grows exponentially
from `start_lr` to `end_lr`. The loss is smoothed, and the suggestion is the learning rate where the
smoothed loss falls fastest against log(lr). The sweep stops once the loss runs away, and the
suggestion is taken only from the points before the lowest loss, so the climb at the end (and the
noisy first steps) never decide it. Only the train split is read; like `objective.train`, this
module knows nothing of Ray or MLflow until `main` records the run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnopt import tracking
from cnnopt.cli import Parser, add_experiment_args, counted, quiet_libraries, run
from cnnopt.data.datasets import ImageData, load_data
from cnnopt.errors import UsageError
from cnnopt.experiment.config import TrainConfig, load_experiment
from cnnopt.tracking.runs import standalone_run
from cnnopt.training.objective import check_choices, check_config, lr_setting, resolve_device, set_up

# Run away, too: the smoothed loss half again above where it stood after the noisy start. A short sweep never
# fell 25% first nor rose to 4x its best: on digits its loss climbed 2.3 -> 5.5 (mini-batches at 56) and the
# finder said it never ran away and to raise --end-lr.
RISE_FACTOR = 1.5
SKIP_START_FRACTION = 0.1  # the first tenth of the sweep is noise around the initial loss (fastai skips 10 of 100)


@dataclass
class LRFinderResult:
    lrs: list[float]  # the learning rate of every step taken, up to the stop
    losses: list[float]  # the smoothed (bias-corrected moving average) training loss after each step
    raw_losses: list[float]  # the mini-batch losses themselves
    suggested_lr: float | None  # steepest descent of the smoothed loss against log(lr); None where it never fell
    min_loss_lr: float  # where the smoothed loss was lowest; fastai's "lr_min" is a tenth of it
    diverged: bool  # the sweep stopped early because the loss ran away (or became NaN/inf)
    start_lr: float
    end_lr: float
    steps: int  # asked for; len(lrs) is how many ran
    settle: int = 0  # the noisy start's steps, which the suggestion and the run-away rule look past


def find_lr(config: TrainConfig, data: ImageData, *, start_lr: float = 1e-6, end_lr: float = 10.0,
            steps: int = 200, smoothing: float = 0.05, diverge_factor: float = 4.0) -> LRFinderResult:
    """Sweep the learning rate exponentially over `steps` mini-batches and suggest one.

    Args:
        config: the model, optimizer, augmentation and seed to test; its `lr` and schedule are ignored.
        data: the splits; only train is read.
        start_lr, end_lr: the range swept, exponentially, first step to last.
        steps: mini-batches to train, cycling over the train set (reshuffled on every pass).
        smoothing: weight of the newest loss in the moving average (fastai's 1 - beta).
        diverge_factor: stop once the smoothed loss exceeds this multiple of the best so far (`ran_away`).
    Returns:
        LRFinderResult with the swept learning rates, the smoothed losses and the suggestion.
    """
    _check(start_lr, end_lr, steps, smoothing, diverge_factor, len(data.train_y))
    setup = set_up(config, data)  # the model, augmentation, optimiser and precision `train` would use
    growth = (end_lr / start_lr) ** (1 / max(1, steps - 1))

    setup.model.train()
    lrs, losses, raw_losses = [], [], []
    average, best, diverged = 0.0, math.inf, False
    skip_start = max(2, int(steps * SKIP_START_FRACTION))
    batches = _batches(len(setup.train_y), config.batch_size, setup.order_generator)
    for step in range(steps):
        lr = start_lr * growth**step
        for group in setup.optimizer.param_groups:
            group["lr"] = lr
        loss = setup.step(next(batches).to(setup.device))[0]
        value = loss.item()  # one sync per step: the stop rule needs the value now
        if not math.isfinite(value):
            diverged = True
            break
        average = (1 - smoothing) * average + smoothing * value
        smoothed = average / (1 - (1 - smoothing) ** (step + 1))  # bias correction for the zero start
        lrs.append(lr)
        losses.append(smoothed)
        raw_losses.append(value)
        best = min(best, smoothed)
        if ran_away(losses, best, skip_start, diverge_factor):
            diverged = True
            break
    if not lrs:
        raise UsageError(f"the loss was NaN or inf from the first step at lr {start_lr:g}; lower --start-lr")
    suggested = suggest_lr(lrs, losses, skip_start, diverge_factor) if fell(losses, skip_start) else None
    return LRFinderResult(lrs, losses, raw_losses, suggested, lrs[int(np.argmin(losses))], diverged, start_lr,
                          end_lr, steps, skip_start)


def ran_away(losses: list[float], best: float, settle: int, diverge_factor: float) -> bool:
    """Whether the smoothed loss, `losses[-1]`, has run away: above `diverge_factor` times its `best` so far, or
    back above where it stood after `settle` steps once it had fallen below 3/4 of that since. A loss that saturates
    at chance (ln(classes): the net forgets it all) never reaches 4x its best: on digits the sweep climbed from
    1.5 to 2.3 past lr 0.3, and the finder said the loss never ran away and to raise --end-lr."""
    value = losses[-1]
    if value > diverge_factor * best:
        return True
    if len(losses) <= settle:
        return False
    return value > RISE_FACTOR * losses[settle] or (value > losses[settle]
                                                    and min(losses[settle:]) < 0.75 * losses[settle])


def fell(losses: list[float], settle: int) -> bool:
    """Whether the smoothed loss fell by 5% from where it stood after the noisy start (`settle` steps; its first
    step, in a sweep that stopped sooner): below that, a flat loss's noise or a loss that ran away at once."""
    after = losses[min(settle, len(losses) - 1):]
    return min(after) < 0.95 * after[0]


def suggest_lr(lrs: list[float], losses: list[float], skip_start: int, diverge_factor: float = 4.0) -> float:
    """The learning rate of steepest descent of `losses` against log(lr).

    Only points from `skip_start` to the lowest loss count, and the lowest loss is sought only before
    the loss first ran away (`ran_away`): nothing after divergence decides.
    """
    values = np.asarray(losses, dtype=float)
    best = np.minimum.accumulate(values)
    end = next((step for step in range(len(values))  # (find_lr stops there; other callers may not)
                if ran_away(losses[:step + 1], best[step], skip_start, diverge_factor)), len(values))
    lowest = int(np.argmin(values[:end]))
    if lowest == 0:
        return lrs[0]  # the loss never fell: the range starts too high
    first = skip_start if lowest - skip_start >= 2 else 0  # a short sweep keeps its early points
    slopes = np.gradient(values, np.log(np.asarray(lrs, dtype=float)))
    return lrs[first + int(np.argmin(slopes[first:lowest + 1]))]


def plot(result: LRFinderResult, path: str | Path) -> Path:
    """Save the smoothed loss against the learning rate (log axis), with the suggestion marked, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)  # Agg, without pyplot's global state or a display
    axes = figure.add_subplot()
    axes.plot(result.lrs, result.raw_losses, color="0.8", linewidth=0.8, label="mini-batch loss")
    axes.plot(result.lrs, result.losses, color="C0", label="smoothed loss")
    marked = result.losses[0]
    if result.suggested_lr is not None:  # none where the loss never fell: a marker would suggest one anyway
        marked = result.losses[result.lrs.index(result.suggested_lr)]
        axes.plot([result.suggested_lr], [marked], "o", color="C3", markersize=8,
                  label=f"suggested lr {result.suggested_lr:.2e}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    top = max(result.losses[0], marked) * 1.5  # the runaway tail would flatten the useful part
    axes.set_ylim(bottom=0, top=top)  # a loss is >= 0: autoscaled on the diverged tail, half the plot was below 0
    stop = "stopped early: loss diverged" if result.diverged else "full sweep"
    none = "" if result.suggested_lr is not None else "\nno suggestion: the smoothed loss never fell 5%"
    axes.set_title(f"learning-rate range test: {len(result.lrs)} of {result.steps} steps, {stop}{none}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


def _batches(count: int, batch_size: int, generator: torch.Generator):
    """Index tensors of full mini-batches over `count` images, reshuffled on every pass, forever."""
    size = min(batch_size, count)
    while True:
        order = torch.randperm(count, generator=generator)
        for first in range(0, count - size + 1, size):
            yield order[first:first + size]


def _check(start_lr: float, end_lr: float, steps: int, smoothing: float, diverge_factor: float,
           count: int = 2) -> None:
    """The sweep's settings; `count`, the train split's images, once the data is loaded."""
    if not (math.isfinite(start_lr) and math.isfinite(end_lr)):  # inf "ran" and suggested 1e-06
        raise UsageError(f"--start-lr and --end-lr must be finite numbers, got {start_lr:g} and {end_lr:g}")
    if not 0 < start_lr < end_lr:
        raise UsageError(f"the learning-rate range must satisfy 0 < --start-lr < --end-lr, got {start_lr:g} to "
                         f"{end_lr:g}")
    if steps < 10:
        raise UsageError(f"--steps must be at least 10 to trace a loss curve, got {steps}; a few hundred is typical")
    if not 0 < smoothing <= 1 or diverge_factor <= 1:
        raise UsageError("smoothing must be in (0, 1] and diverge_factor greater than 1")
    if count < 2:
        raise UsageError(f"the train split holds {counted(count, 'image')}; BatchNorm needs at least 2 per batch")


def plot_formats() -> list[str]:
    """The file suffixes matplotlib can save a figure as."""
    from matplotlib.figure import Figure

    return sorted(Figure().canvas.get_supported_filetypes())


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m cnnopt.lr_finder", description=__doc__.split("\n")[0])
    add_experiment_args(parser)
    parser.add_argument("--steps", type=int, default=200, help="mini-batches in the sweep (default: 200)")
    parser.add_argument("--start-lr", type=float, default=1e-6, help="first learning rate (default: 1e-6)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last learning rate (default: 10)")
    parser.add_argument("--output", default="lr_finder.png", help="where to save the plot (default: lr_finder.png)")
    parser.add_argument("--run-name", help="MLflow run name (default: <experiment>-lr-finder)")
    args = parser.parse_args(argv)
    quiet_libraries()
    output = Path(args.output)
    formats = plot_formats()
    if output.is_dir() or output.name in ("", ".", "..") or args.output.endswith(("/", os.sep)):
        # The plot went to "<folder>.png" and MLflow then logged the whole folder as the run's artifacts.
        parser.error(f"argument --output: {args.output} is a folder; give the plot's file, such as "
                     f"{Path(args.output) / 'lr_finder.png'}")
    if output.suffix and output.suffix[1:].lower() not in formats:  # checked before the sweep, not after it
        parser.error(f"argument --output: {args.output} is no plot format matplotlib writes ({', '.join(formats)}; "
                     "no suffix: png)")
    output = output if output.suffix else output.with_name(output.name + ".png")  # the file written and logged
    tracking.check_writable(output.resolve().parent, f"the plot's folder for --output {args.output}",
                            "give --output a path in a writable folder")

    experiment = load_experiment(args.experiment, args.overrides)
    config = experiment.train
    _check(args.start_lr, args.end_lr, args.steps, 0.05, 4.0)  # before the data loads or any run exists
    resolve_device(config.device)
    check_choices(config)
    # A store that cannot be used: said in seconds, not after a big folder's decode (and nothing made yet).
    tracking.check_store(tracking.tracking_uri(), create=False)
    data = load_data(experiment.data)
    _check(args.start_lr, args.end_lr, args.steps, 0.05, 4.0, len(data.train_y))
    check_config(config, data.image_size)
    print(f"{experiment.name}: {len(data.train_y)} train images, {config.optimizer} optimizer, batch {config.batch_size}; "
          f"sweeping lr {args.start_lr:g} to {args.end_lr:g} over {args.steps} steps")

    with standalone_run(experiment, args.run_name or f"{experiment.name}-lr-finder", "lr_finder",
                        params={"steps": args.steps, "start_lr": args.start_lr, "end_lr": args.end_lr},
                        dataset=tracking.train_dataset(experiment.data, data.train_x, data.train_y)) as record:
        result = find_lr(config, data, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
        path = plot(result, output)
        record.log_artifact(path)
        suggests = result.suggested_lr is not None  # else its steepest descent would be noise: none is suggested
        record.log(metrics={**({"suggested_lr": result.suggested_lr,  # and the train.lr to set:
                                "suggested_lr_setting": lr_setting(config, result.suggested_lr)} if suggests else {}),
                            "min_loss_lr": result.min_loss_lr, "steps_run": len(result.lrs),
                            "diverged": float(result.diverged)},
                   tags={} if suggests else {"no_suggestion": "the smoothed loss never fell 5% below where it stood "
                                                              "after the sweep's start"})
        record.end()

    stop = (f"stopped at step {len(result.lrs)} of {args.steps}: the loss diverged at lr {result.lrs[-1]:.2e}"
            if result.diverged else f"ran all {args.steps} steps without diverging")
    print((f"suggested lr {result.suggested_lr:.2e} (steepest descent of the smoothed loss); " if suggests else "")
          + f"lowest loss at lr {result.min_loss_lr:.2e}; {stop}")
    if not suggests:
        why = ("it ran away at once: the range starts too high; lower --start-lr" if result.diverged
               and len(result.lrs) <= result.settle + 1 else
               "it ran away first: give more --steps (the smoothed loss averages ~20), or lower --start-lr"
               if result.diverged else "the range is too low for it to move; raise --end-lr")
        print(f"no suggestion: the smoothed loss never fell 5% below where it stood after the sweep's start; {why}, "
              f"and run again; plot saved to {path}")
    else:
        if result.suggested_lr == result.lrs[0]:
            print("the suggestion sits at the start of the range: lower --start-lr and run again")
        elif not result.diverged:
            print("the loss never ran away: raise --end-lr (or --steps) to see where it diverges")
        # The sweep's rates are at this batch size; with train.lr_batch, train.lr is the rate per lr_batch images.
        per = (f" (a rate per train.lr_batch = {config.lr_batch} images: {result.suggested_lr:.3g} at batch "
               f"{config.batch_size})" if config.lr_batch else "")
        print(f"try: --set train.lr={lr_setting(config, result.suggested_lr):.3g}{per}; plot saved to {path}")
    print(f"MLflow run {record.run_id} in experiment '{experiment.name}'; browse with: {tracking.ui_command()}")
    return 0


if __name__ == "__main__":
    run(main)
