"""A time budget planned: the best model these minutes can buy on this hardware.

`--time-budget MINUTES` is the whole command, from its start to the promoted model. Once Ray is up
and the data loaded, a probe trains the search space's middle configuration for a few steps on every
trial slot at once (so the cores are shared as the trials will share them) and measures what an
epoch costs. The minutes left are then split:

- finish: an allowance for the promotion (the one test pass, the export and the registry), for
  stopping Ray and the process's exit, and for the report where no final training runs (the report
  is built on a thread while the final trains, so there its seconds are the final's);
- final (search.reserve of the rest): the chosen configuration trained once more, alone on a whole
  node, for as many epochs as fit, its schedule stretched to them (`cnnopt.study.final`);
- confirmation: the best configurations re-trained with new seeds, where at least two configurations
  with two seeds each fit in a fifth of the search's time (in waves of as many runs as there are trial
  slots); else it is skipped;
- search: the trials, under ASHA: every trial gets `search.grace_period` (1) probe epochs, the best
  third of them three times as many, and so on up to `max_epochs`, the deepest rung that still leaves enough trials (at least
  `MIN_TRIALS`, and two for each that reaches the top) and that a trial reaches within `TOP_SHARE` of the
  search's time (on many slots, slot-seconds alone would allow a rung longer than the search). Where even one epoch each does not leave enough
  trials, the search trains on a stratified subset of the train split (the final training uses all).
  Those epochs are the probe's: a trial's currency is time (`trial_seconds`, ASHA's rungs in seconds
  of training), so a configuration twice as fast trains twice the epochs (at most train.epochs) and
  the search compares configurations at equal time, as the final training will run them.
  A trial whose one epoch would take longer than a trial's whole share of the search (`epoch_limit`:
  its expected epochs at the probe's cost, plus a trial's fixed overhead) is stopped. No trial starts
  once it could not reach the first rung before the search's share ends (`last_start`): it would only
  be cut short, its time spent for nothing ASHA or the sampler could rank.

A resume of a study whose search had ended (what follows it was cut short) does not plan again: it goes on
with the plan the study searched with, for the phases after the search (`after_search`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

import ray

from cnnopt.data.datasets import ImageData
from cnnopt.cli import counted
from cnnopt.errors import UsageError
from cnnopt.experiment.config import Experiment, SearchConfig
from cnnopt.experiment.space import Space
from cnnopt.study.trainable import assigned_device, check_no_test, gpu_share
from cnnopt.tracking import param_value
from cnnopt.training.objective import epoch_seconds, seconds_per_image

# What follows the trials, measured on 2 cores (digits, 40 trials: report 4-5 s, promotion 5 s, exit 3.7 s;
# 5,000 CIFAR-10 images: promotion 8-9 s), with a margin. The allowances were 10, 20 and 8 s: a 1-min budget
# kept 38 s for the ~9 s this takes and ended at 0.5 min, its search given 11 s.
REPORT_SECONDS = 8.0  # the study report's figures and importances, where no final training runs beside it
PROMOTION_SECONDS = 8.0  # a promotion's export, fresh-process check and registry; its test pass is counted apart
# More where the trials train on a GPU: the promotion starts CUDA in the driver and loads the whole dataset there
# (full CIFAR-10 on an H200, 2026-11-28: the finish took 22 s of the 13 kept, and the 9.04-min study 556 s).
GPU_PROMOTION_SECONDS = 12.0
# A test image's seconds as a share of a training image's: a forward pass, two with flip TTA (measured 0.37 with
# flip TTA: 20,000 32x32 test images planned at 2/3 took 9 s of 16).
TEST_SHARE = 0.5
EXIT_SECONDS = 5.0  # after the budget's last line: Ray's stop and the process's exit
# Before the first trial: Ray's start, the data and the probe (measured 9-10 s for digits on 2 cores), and a
# few seconds of trials: what a refusal made before Ray starts asks for beyond the allowances.
FIRST_SECONDS = 15.0
# Once, as the search starts: Ray starts the trials' first workers (each imports torch and the training code,
# and fetches the data: ~6 s on 2 cores), before any trial trains. Unplanned, a 0.8-min digits plan's 7-s search
# ended before any trial finished.
TRIALS_START = 5.0
CONFIRM_START = 3.0  # a confirmation's own start: its data loaded again and sent to the workers (measured 2-3 s)
MIN_TRIALS = 8  # fewer trials than this is not a search
CONFIRM_SHARE = 0.2  # of the search's time, the most a confirmation may take
# Of the search's time, the most a trial that reaches the top rung may train: on many slots the trials'
# seconds in all would allow rungs (and confirmation runs) longer than the search itself lasts.
TOP_SHARE = 1 / 3
MIN_SUBSET = 0.1  # the smallest share of the train split a search may use
TRIAL_OVERHEAD = 1.0  # seconds a trial costs beyond its epochs (start, first batch, checkpoint, record): measured ~1 s
# A plan's trials may run to this many times its estimate: the search's time ends them. Digits' trials cost
# ~0.26 slot-seconds beyond their epochs, not TRIAL_OVERHEAD's 1 s: at 2x, then 4x, the bound ended 1-2 min
# searches at 11 s of 17, 34 of 43.
TRIALS_BOUND = 10
# After a final's training, within its seconds: its checkpoint and MLflow record, its check against its trial
# (a 1-min digits final planned 20 s took 22 with its training held to the plan's end).
FINAL_RECORD = 2.0
FINAL_OVERHEAD = 10.0  # seconds a final training costs beyond its epochs (a worker, the data, its own timing)


@dataclass(frozen=True)
class Plan:
    """How a budget is spent; seconds are wall-clock, from the command's start."""

    budget: float  # seconds in all
    started: float  # seconds spent before planning (Ray, data, probe)
    epoch: float  # a trial's epoch here, measured by the probe (on the search's data)
    slots: int  # trials at once
    search: float
    confirm: float
    final: float
    finish: float
    report: float  # of finish, the report's seconds (where no final training overlaps it)
    promote: bool  # a promotion follows (else no confirmation or final training is planned)
    confirm_asked: bool  # search.confirm_top asks for a confirmation (it is planned where it fits)
    max_epochs: int  # ASHA's max_t: the most epochs a trial gets while searching
    grace: int
    reduction: int
    trials: int  # trials expected to fit
    epoch_limit: float  # a trial whose epoch would take longer is stopped
    subset: int  # train images while searching; 0 = all
    train_images: int  # of the whole train split
    confirm_top: int
    confirm_seeds: int
    scheduler: str  # asha, or fifo when trials get one epoch
    resumed: bool = False  # a resume's: the study's plan for the phases after its search (`after_search`)
    reserved: bool = True  # search.reserve asks for a final training (not recorded: it only words the plan)

    @property
    def trial_seconds(self) -> float:
        """What a trial that reaches the top rung trains for: the probe's configuration, max_epochs."""
        return self.max_epochs * self.epoch

    def rungs(self) -> list[int]:
        rungs, epochs = [], self.grace
        while epochs <= self.max_epochs:
            rungs.append(epochs)
            epochs *= self.reduction
        return rungs

    def apply(self, experiment: Experiment) -> Experiment:
        """The experiment the search and the confirmation run: the plan's epochs, trials, rungs and data."""
        # Trials run until the search's share ends: up to TRIALS_BOUND times the estimate, where they end
        # sooner (tiny ones cost less than TRIAL_OVERHEAD: capped at twice the estimate, a 1-min digits search
        # ran its 40 and stopped 3 s early).
        search = dataclasses.replace(experiment.search, trials=TRIALS_BOUND * self.trials, scheduler=self.scheduler,
                                     grace_period=self.grace, reduction_factor=self.reduction,
                                     epoch_limit=self.epoch_limit, trial_seconds=self.trial_seconds,
                                     grace_seconds=self.grace * self.epoch, confirm_top=self.confirm_top,
                                     confirm_seeds=self.confirm_seeds, time_budget=self.search / 60)
        data = dataclasses.replace(experiment.data, subset=self.subset) if self.subset else experiment.data
        return dataclasses.replace(experiment, search=search, data=data)  # train.epochs: the most a trial trains

    def lines(self) -> list[str]:
        """The plan, as printed when the study starts."""
        if self.resumed:
            left = [f"{phase} {seconds:.0f}s" for phase, seconds in
                    (("confirm", self.confirm), ("final", self.final), ("finish", self.finish)) if seconds]
            return [f"time budget {self.budget / 60:g} min, resumed after its search: {self.started:.0f}s to start, "
                    f"then the plan's {', '.join(left)}"]
        data = f"{self.subset:,} of the {self.train_images:,} train images" if self.subset else "all train images"
        rungs = (f"ASHA rungs at {', '.join(shown(r * self.epoch) for r in self.rungs())}s of training"
                 if self.scheduler == "asha" else "one epoch each")
        confirm = (f"the best {self.confirm_top} configurations x {self.confirm_seeds} new seeds, "
                   f"{shown(self.trial_seconds)}s of training each" if self.confirm_top else
                   "skipped: no promotion follows (--no-promote)" if not self.promote else
                   "skipped: off (--no-confirm)" if not self.confirm_asked else
                   "skipped (two configurations x two seeds do not fit in a fifth of the search)")
        return [f"time budget {self.budget / 60:g} min: {self.started:.0f}s to start; a trial's epoch costs "
                f"~{shown(self.epoch)}s here ({self.slots} at once)",
                f"  search  {self.search:5.0f}s  ~{self.trials} trials of up to {shown(self.trial_seconds)}s of training "
                f"(the probe's configuration: {counted(self.max_epochs, 'epoch')}; a faster "
                f"one trains more), {rungs}, {data}; an epoch over {shown(self.epoch_limit)}s is stopped",
                f"  confirm {self.confirm:5.0f}s  {confirm}",
                f"  final   {self.final:5.0f}s  " + ("the chosen configuration trained again on a whole node, epochs "
                                                 "to fill the time" if self.final else
                                                 "skipped: no promotion follows (--no-promote)" if not self.promote
                                                 else "skipped: search.reserve = 0" if not self.reserved else
                                                 "skipped: the reserve would not train longer than a trial"),
                f"  finish  {self.finish:5.0f}s  " + ", ".join(
                    (["test once, export, register"] if self.promote else []) + (["the report"] if self.report else [])
                    + ["stop Ray and exit"])]

    def params(self) -> dict:
        """The plan as MLflow params of the study's parent run."""
        return {f"plan.{key}": value for key, value in self.record().items()}

    def record(self) -> dict:
        """The plan's fields as recorded (`params`, or a tag where a resume planned again), floats to 0.01."""
        return {key: (round(value, 2) if isinstance(value, float) else value)
                for key, value in dataclasses.asdict(self).items() if key not in ("resumed", "reserved")}

    @classmethod
    def recorded(cls, values: dict) -> Plan | None:
        """A plan read back from its `record` (MLflow's strings, or the values themselves); None where it
        lacks a field or a value does not read (a study that recorded no plan, or an older one)."""
        kinds = typing.get_type_hints(cls)
        try:
            return cls(**{field.name: param_value(str(values[field.name]), kinds[field.name])
                          for field in dataclasses.fields(cls) if field.name not in ("resumed", "reserved")})
        except (KeyError, ValueError):
            return None

    @property
    def final_ends(self) -> float:
        """Seconds from the command's start by which the final training ends: the finish follows it."""
        return self.started + self.search + self.confirm + self.final

    @property
    def final_deadline(self) -> float:
        """Seconds from the command's start by which the final's own training must end: its record follows,
        in the final's seconds (FINAL_RECORD)."""
        return self.final_ends - FINAL_RECORD

    def serves(self, promote: bool) -> bool:
        """Whether a resume after the search can go on with this plan: not one that promotes where the plan
        was made without a promotion (--no-promote): it has no seconds for a confirmation, a final training
        or the promotion, so that resume plans again."""
        return self.promote or not promote

    def after_search(self, started: float, *, confirm: bool, promote: bool) -> Plan:
        """This plan, as a resume of a study whose search had ended goes on with it: the phases after the
        search, each with the seconds it was planned (work cut short in it is done again: a final training
        interrupted is trained anew), after this command's own start (`started` seconds). What was done
        before is reused as the phases run (recorded confirmation seeds, a recorded final training, a
        promotion); a confirmation or a final training this command skips (--no-confirm, --no-promote) is
        dropped with its seconds."""
        confirms = confirm and promote and self.confirm_top > 0
        return dataclasses.replace(self, started=started, search=0.0, resumed=True, promote=promote,
                                   confirm=self.confirm if confirms else 0.0,
                                   confirm_top=self.confirm_top if confirms else 0,
                                   confirm_seeds=self.confirm_seeds if confirms else 0,
                                   final=self.final if promote else 0.0)


def shown(seconds: float) -> str:
    """Seconds as the plan prints them: whole ones, tenths below ten, hundredths below a tenth (digits' epochs
    take a few: "~0.0s" said nothing)."""
    return f"{seconds:.2f}" if seconds < 0.095 else f"{seconds:.1f}" if seconds < 9.95 else f"{seconds:.0f}"


def last_start(search: SearchConfig) -> float | None:
    """Seconds into a planned search after which a new trial could not reach ASHA's first rung (its
    grace seconds of training, and a trial's overhead) before the search's share ends; None where the
    search has no planned share."""
    if not (search.time_budget and search.grace_seconds):
        return None
    return max(0.0, search.time_budget * 60 - search.grace_seconds - TRIAL_OVERHEAD)


def expected_trials(search: SearchConfig) -> int:
    """The trials a search expects to run: a planned one's estimate (its search.trials is TRIALS_BOUND times
    that, the most it may run before its time ends it), else search.trials."""
    planned = search.time_budget and search.grace_seconds  # as `last_start` tells a planned search
    return max(1, search.trials // TRIALS_BOUND) if planned else search.trials


def allowances(promote: bool, report: bool, test_seconds: float = 0.0, gpu: bool = False) -> tuple[float, float]:
    """Seconds a budget keeps for what follows the trials: (finish: the promotion where one follows, its
    test pass's `test_seconds` included, more where the trials use a `gpu`, and the exit; the report, where one
    is built)."""
    promotion = PROMOTION_SECONDS + test_seconds + (GPU_PROMOTION_SECONDS if gpu else 0.0)
    return (promotion if promote else 0.0) + EXIT_SECONDS, REPORT_SECONDS if report else 0.0


def at_least(seconds: float) -> str:
    """The --time-budget a refusal asks for, where `seconds` are needed: a fifth more, a tenth of a minute up."""
    return f"{math.ceil(seconds / 6 * 1.2) / 10:g}"


def make_plan(search: SearchConfig, max_epochs: int, *, budget: float, started: float, epoch: float, slots: int,
              train_images: int, classes: int = 1, test_images: int = 0, promote: bool = True,
              report: bool = True, gpu: bool = False) -> Plan:
    """Split a budget given what an epoch costs; pure arithmetic (the probe is `measure_epoch`).

    Args:
        search: the [search] settings (reserve, reduction_factor, confirm_top, confirm_seeds).
        max_epochs: the experiment's train.epochs: the most a trial may get.
        budget, started: the budget and what is spent already, in seconds.
        epoch: seconds of one trial's epoch on all the train images, with `slots` trials at once.
        slots: trials at once.
        train_images: the train split's size.
        classes: the number of classes: the fewest images a train subset keeps (one of each).
        test_images: the test split's size: the promotion's one test pass, at TEST_SHARE of a training
            image's seconds (the probe's), is kept in finish (on a big folder it is no fixed few seconds).
        promote: a promotion follows the search (its seconds are kept in finish, with the exit's); without
            one, the confirmation and the final training (which serve it) are not planned, and the search
            gets their time.
        report: a report is built; its seconds are the final training's where one runs (the report is
            built meanwhile), else kept in finish too.
        gpu: the trials train on a GPU: the promotion takes longer (GPU_PROMOTION_SECONDS).
    Raises:
        UsageError: when not even MIN_TRIALS trials of one epoch on a tenth of the data fit.
    """
    if not promote:
        search = dataclasses.replace(search, reserve=0.0, confirm_top=0)
    finish, report = allowances(promote, report, test_images * TEST_SHARE * epoch / max(1, train_images), gpu)
    remaining = budget - started - finish - report
    plan = _split(search, max_epochs, remaining, search.reserve * remaining, epoch, slots)
    if plan["final"] and (plan["final"] - FINAL_OVERHEAD) / epoch <= plan["max_epochs"]:
        # The reserve would not train the winner longer than its trial was (even with no speed-up from
        # having the node to itself): give it to the search instead.
        plan = _split(search, max_epochs, remaining, 0.0, epoch, slots)
    if plan["fraction"] < MIN_SUBSET:
        needed = max(MIN_TRIALS, 2 * slots)
        shortest = started + finish + report + TRIALS_START + needed * (epoch * MIN_SUBSET + TRIAL_OVERHEAD) / slots
        raise UsageError(f"a time budget of {budget / 60:g} min is too short here: {started:.0f}s went to starting, "
                         f"{finish + report:.0f}s are kept for what follows the trials, and {needed} trials of one "
                         f"epoch on a tenth of the data (~{shown(epoch * MIN_SUBSET)}s each, {slots} at once, with "
                         f"their workers' start and ~{TRIAL_OVERHEAD:.0f}s each beyond their epoch) need more; give "
                         f"--time-budget at least {at_least(shortest)}")
    if plan["final"]:
        plan["final"] += report
        report = 0.0
    finish += report
    fraction = plan.pop("fraction")
    return Plan(budget=budget, started=started, slots=slots, finish=finish, report=report, promote=promote,
                reserved=search.reserve > 0,
                confirm_asked=search.confirm_top >= 2, grace=search.grace_period, reduction=search.reduction_factor,
                subset=min(train_images, max(int(train_images * fraction), classes)) if fraction < 1 else 0,
                train_images=train_images, **plan)


def _split(search: SearchConfig, max_epochs: int, remaining: float, final: float, epoch: float, slots: int) -> dict:
    """The search's ladder, trials, data share and confirmation in `remaining - final` seconds."""
    rest = remaining - final
    reduction, grace = search.reduction_factor, search.grace_period
    needed = max(MIN_TRIALS, 2 * slots)
    slot_seconds = max(0.0, (rest - TRIALS_START) * slots - needed * TRIAL_OVERHEAD)
    fraction = min(1.0, slot_seconds / (needed * epoch * grace))
    epoch *= fraction  # the search's epoch, on the subset when the full train split does not fit

    def per_trial(depth: int) -> float:  # epochs a trial gets on average under ASHA with rungs up to depth
        rungs = round(math.log(depth / grace, reduction)) + 1
        return grace * (1 + (rungs - 1) * (reduction - 1) / reduction)

    top, depth = grace, grace
    while depth <= max_epochs and fraction > 0:  # the deepest ladder that leaves enough trials, in time
        if (slot_seconds / (per_trial(depth) * epoch + TRIAL_OVERHEAD) >= max(needed, 2 * depth // grace)
                and depth * epoch + TRIAL_OVERHEAD <= TOP_SHARE * rest):
            top = depth
        depth *= reduction
    confirm_top, confirm_seeds, confirm = 0, 0, 0.0
    if search.confirm_top >= 2 and fraction > 0:
        run_seconds = top * epoch + TRIAL_OVERHEAD  # a confirmation run trains as long as a top trial
        runs = int(max(0.0, CONFIRM_SHARE * rest - CONFIRM_START) / run_seconds) * slots  # waves of `slots` runs
        if runs >= 4:
            confirm_top = min(search.confirm_top, runs // 2)
            confirm_seeds = min(search.confirm_seeds, runs // confirm_top)
            confirm = CONFIRM_START + math.ceil(confirm_top * confirm_seeds / slots) * run_seconds
    searching = rest - confirm
    cost = per_trial(top) * epoch + TRIAL_OVERHEAD
    trials = max(needed, int((searching - TRIALS_START) * slots / cost)) if fraction > 0 else needed
    return {"search": searching, "confirm": confirm, "final": final, "epoch": epoch, "max_epochs": top,
            "trials": trials, "epoch_limit": cost, "confirm_top": confirm_top,
            "confirm_seeds": confirm_seeds, "scheduler": "asha" if top > grace else "fifo", "fraction": fraction}


def measure_epoch(experiment: Experiment, space: Space, data: ImageData, search: SearchConfig, slots: int) -> float:
    """Seconds of one trial's epoch here: the space's middle configuration timed on `slots` Ray tasks at
    once, each with a trial's resources; the slowest of them."""
    config = space.apply(experiment.train, space.middle())
    task = ray.remote(num_cpus=search.cpus_per_trial, num_gpus=search.gpus_per_trial)(_per_image)
    shared = ray.put(data)
    per_image = max(ray.get([task.remote(config, shared) for _ in range(slots)]))
    return epoch_seconds(per_image, data, config)


def _per_image(config, data: ImageData) -> float:
    """In a Ray worker: seconds per training image (the GPU when Ray assigned one)."""
    return seconds_per_image(assigned_device(config), check_no_test(data), device_share=gpu_share())
