"""`python -m cnnopt.search`: run a hyperparameter study on Ray Tune and record every trial in MLflow.

Defaults come from the experiment's [search] table; each flag below overrides one of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import sys
import threading
import time

STARTED = time.perf_counter()  # before the heavy imports below: a time budget counts the command's whole wall time

import search_spaces  # noqa: E402 - after STARTED on purpose
from cnnopt import tracking, trials
from cnnopt.cli import Parser, add_experiment_args, counted, quiet_libraries, run
from cnnopt.experiment.config import TrainConfig, check_flag, load_experiment, same_name_warning
from cnnopt.insight.report import log_report
from cnnopt.errors import UsageError
from cnnopt.promote import print_promotion, promote
from cnnopt.deploy.promotion import NotLearnt
from cnnopt.study.callback import format_value
from cnnopt.study.confirmation import confirm, figures
from cnnopt.study.final import train_final
from cnnopt.study.runner import (CLOSE_SECONDS, SCHEDULERS, StudyOptions, check_space_values, default_study_name,
                                 resume_command, run_study, stop_ray)
from cnnopt.study.strategies import STRATEGIES
from cnnopt.tracking import studies
from cnnopt.tracking.recorder import record_budget, record_choice

# Flags that override the experiment's [search] table, each named like its setting.
SEARCH_FLAGS = ("strategy", "trials", "concurrency", "scheduler", "cpus_per_trial", "gpus_per_trial", "seed",
                "time_budget")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m cnnopt.search", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(parser)
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="grid: every combination of the space's grid values in order; random: independent "
                             "draws; bayes: Optuna TPE (multivariate); gp: Optuna Gaussian process")
    parser.add_argument("--trials", type=int, metavar="N", help="number of trials (grid: the first N points)")
    parser.add_argument("--concurrency", type=int, metavar="K",
                        help="trials at once (default, or 0: as many as the CPUs / GPU shares hold)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="fifo runs every trial to the end; asha stops "
                        "bad trials early at epoch rungs")
    parser.add_argument("--cpus-per-trial", type=float, metavar="C", help="CPUs reserved per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, metavar="G",
                        help="GPUs per trial: a share (0.25 puts four trials on one GPU), a whole number, 0 for "
                             "the CPU; default -1 (auto): search.trials_per_gpu trials on each GPU the cluster "
                             "has, the CPU where it has none")
    parser.add_argument("--address", metavar="RAY_ADDRESS",
                        help="attach to a Ray cluster ('auto' or 'ray://host:10001'); default: start a local one")
    parser.add_argument("--name", metavar="STUDY", help="study name (default: <experiment>-<strategy>-<time>); "
                        "needed with --resume")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study --name STUDY")
    parser.add_argument("--seed", type=int, metavar="S", help="the sampler's seed")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="the best model these minutes buy: the whole command (search, confirmation, the final "
                             "training of the chosen configuration, promotion) is planned to end within them, from "
                             "what a trial's epoch costs here (printed at the start); 0: no budget (the default)")
    parser.add_argument("--no-report", action="store_true",
                        help="skip the study report (figures, importance, edges of the space) on the parent run")
    parser.add_argument("--no-confirm", action="store_true",
                        help="promote the best trial as it is, without re-training the best configurations with "
                             "new seeds first (search.confirm_top=0)")
    parser.add_argument("--no-promote", action="store_true",
                        help="skip promoting the best trial (test evaluation, export, registry), and with it the "
                             "confirmation and the final training, which only serve the promotion")
    parser.add_argument("--list-spaces", action="store_true", help="list the search spaces and exit")
    return parser


def list_spaces() -> None:
    for name in search_spaces.names():
        try:
            space = search_spaces.get(name)
            check_space_values(space, TrainConfig())  # values no trial could train: every study refuses it
        except UsageError as exc:  # one broken module: the others are still listed
            print(f"{name}: cannot be used: {exc}")
            continue
        summary = space.description.strip().split("\n\n")[0]  # the first paragraph, which may wrap over lines
        print(f"{name}: {' '.join(summary.split())}")
        print(f"    {', '.join(space.names)}")


def main(argv: list[str] | None = None) -> int:
    started = STARTED if argv is None else time.perf_counter()  # a time budget counts from here
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    if args.list_spaces:
        list_spaces()
        return 0
    if args.resume and not args.name:
        parser.error("--resume needs --name STUDY (the name printed when the study started)")
    for flag in SEARCH_FLAGS:
        if getattr(args, flag) is not None and flag != "strategy":
            check_flag(f"--{flag.replace('_', '-')}", f"search.{flag}", getattr(args, flag))
    overrides = list(args.overrides) + [f"search.{flag}={getattr(args, flag)}"
                                        for flag in SEARCH_FLAGS if getattr(args, flag) is not None]
    if args.resume:
        flags = [flag for flag in SEARCH_FLAGS if getattr(args, flag) is not None and flag != "time_budget"]
        if args.overrides or flags or args.experiment:
            given = ((["--experiment"] if args.experiment else []) + [f"--set {item}" for item in args.overrides]
                     + [f"--{flag.replace('_', '-')}" for flag in flags])
            parser.error(f"--resume continues a study with the settings it started with; drop {', '.join(given)} "
                         "(only --address, --time-budget, --no-report, --no-confirm and --no-promote go with it)")
        studies.check_study_name(args.name)  # a name that is no name is said as such, store or not
        tracking.require_store(f"study {args.name!r}")
        parent, experiment = studies.resume_record(tracking.make_client(), args.name)  # one read of the parent
        if args.time_budget is not None:  # a new budget for this command: the recorded one may no longer fit here
            if not experiment.search.time_budget:
                parser.error(f"study {args.name!r} has no time budget, and its resume cannot add one; drop --time-budget")
            if not args.time_budget:
                parser.error("--time-budget 0 would drop the study's budget on its resume; give it the minutes this "
                             "command may take")
            if studies.search_ended(parent):  # it goes on with the plan it searched with
                parser.error(f"study {args.name!r} had ended its search: its resume goes on with the plan the search "
                             "ran with (its confirmation, final training and promotion), which a new budget would "
                             "not change; drop --time-budget")
            experiment = dataclasses.replace(experiment, search=dataclasses.replace(
                experiment.search, time_budget=args.time_budget))
        if (complete := complete_line(parent, args.name)) is not None:
            print(complete)
            return 0
        if args.no_confirm:  # like the report and the promotion, what follows the trials is this command's choice
            experiment = dataclasses.replace(experiment, search=dataclasses.replace(experiment.search, confirm_top=0))
    else:
        experiment = load_experiment(args.experiment, overrides + ["search.confirm_top=0"] * args.no_confirm)
    if not args.resume and (warning := same_name_warning(experiment)):
        print(warning, file=sys.stderr)
    name, search = args.name or default_study_name(experiment), experiment.search
    if search.time_budget and args.trials is not None and not args.resume:  # 70 trials ran, without a word
        print(f"warning: --trials {args.trials} has no effect under a time budget: the plan sets how many trials "
              "fit; leave out --time-budget to run a number of trials", file=sys.stderr)
    trials_shown = counted(search.trials, "trial")
    if search.strategy == "grid":  # a grid runs its points once: --trials beyond them adds none
        space = search_spaces.get(experiment.search_space)
        runs, points = STRATEGIES["grid"].planned(space, search.trials), len(space.grid())
        trials_shown = (f"{counted(runs, 'trial')} of its {points:,} grid points" if runs < points else
                        f"{runs} trials: every grid point" + (f" (--trials {search.trials} asked for more)"
                                                                if search.trials > points else ""))
    shape = (f"trials and their time planned from a {search.time_budget:g}-min time budget" if search.time_budget
             else f"{trials_shown}, scheduler {search.scheduler}, {counted(experiment.train.epochs, 'epoch')} each")
    header = (f"study {name}: {search.strategy} over search space '{experiment.search_space}', {shape}"
              + (" (resuming)" if args.resume else ""))  # printed once Ray is up, with where the trials run
    # Ray stays up from the search to the end of the command: the confirmation and the final training run on
    # the same instance and its warm workers instead of starting and stopping their own (~6 s each here).
    options = StudyOptions(name=name, address=args.address, resume=args.resume, header=header, started=started,
                           report=not args.no_report, promote=not args.no_promote, confirm=not args.no_confirm,
                           keep_ray=True)
    outcome = run_study(experiment, options)
    try:
        return after_study(experiment, outcome, args, started)
    finally:
        if outcome.ray_kept:
            stop_ray()


def complete_line(parent, name: str) -> str | None:
    """What a resume of study `name` (its parent run `parent`) says where nothing is left, before Ray starts: its
    trials ran, what followed them is done and its winner promoted (so its test split is not read again); None
    where anything is left."""
    promoted = parent.data.tags.get("promoted_run_id")
    if not promoted or parent.data.tags.get(studies.FINISH_TAG) != "done":
        return None
    score = parent.data.metrics.get("promoted_test_accuracy")
    return (f"study {name!r} is complete: it promoted run {promoted}"
            + (f" (test accuracy {score:.4f})" if score is not None else "") + "; nothing is left to resume. "
            f"Its report again: python -m cnnopt.report --study {name}; a promotion again, on purpose: "
            f"python -m cnnopt.promote --run-id {promoted}; more trials: a new study")


def after_study(experiment, outcome, args: argparse.Namespace, started: float) -> int:
    """The study's summary, then its report, confirmation, final training and promotion; the exit code."""
    resume = resume_command(StudyOptions(name=outcome.name, address=args.address, report=not args.no_report,
                                         promote=not args.no_promote, confirm=not args.no_confirm))
    print_summary(experiment, outcome)
    # No finish follows (it prints and logs the budget's table): this command's table is printed and logged here.
    if outcome.plan is not None and outcome.parent_run_id and (outcome.interrupted or outcome.best is None):
        print_budget(outcome, {}, time.perf_counter() - started, outcome.interrupted)
    if outcome.interrupted:
        print(f"\nThe study was interrupted. Resume it (with the settings it started with, from any machine that "
              f"reaches the tracking store) by:\n  {resume}")
        return 130
    if experiment.search.time_budget and not any(outcome.counts.get(status) for status in trials.ENDED):
        print(f"error: the time budget ({experiment.search.time_budget:g} min) ended before any trial finished; "
              "it counts Ray's start-up and each trial's first epochs: give --time-budget more minutes",
              file=sys.stderr)
        return 2
    if outcome.best is None:  # a study of failed trials is a failed study, for the script or CI that ran it
        print("error: no trial completed" + (", so there is nothing to promote" if not args.no_promote else "")
              + "; the trial lines above show their errors (each whole on its MLflow run, tag 'error')",
              file=sys.stderr)
        return 1
    client = tracking.make_client()
    studies.mark_finish(client, outcome.parent_run_id, "running")
    recording = done = False
    try:
        code = finish(experiment, outcome, report=not args.no_report, promotion=not args.no_promote,
                      address=args.address, started=started)
        recording = True
        studies.mark_finish(client, outcome.parent_run_id, "done")
        done = True
        # Ended again, now: the parent ended with the search, and the confirmation, final training and promotion
        # wrote to it for minutes after (QA: the MLflow UI showed the study shorter than it ran).
        try:
            tracking.end_run(client, outcome.parent_run_id, tracking.FINISHED)
        except Exception as exc:  # noqa: BLE001 - only its end time: the study is complete and recorded (review)
            logging.getLogger(__name__).warning("could not end the study's parent run again: %s", exc)
        return code
    except KeyboardInterrupt:  # the trials are recorded; a resume runs none again and finishes the rest
        # Only where it came inside the write that says done is the store read (a store that hangs is a common
        # reason for a Ctrl-C: the resume line must not wait on it).
        if done or (recording and finish_done(client, outcome.parent_run_id)):  # nothing is left to do
            print("\ninterrupted as the command ended; the study is complete and recorded", file=sys.stderr)
        else:
            print(f"\ninterrupted after the trials; the study is recorded. Finish what follows them by:\n"
                  f"  {resume}", file=sys.stderr)
            end_interrupted_finish(client, outcome.parent_run_id)
        return 130


def end_interrupted_finish(client, parent_run_id: str) -> None:
    """End the parent KILLED, as the exit code 130 says (QA: it stayed FINISHED from its search's end, with only
    its `finish` tag saying what follows the trials was cut short). After the resume line, on a thread waited for
    CLOSE_SECONDS at most: a store that hangs is a common reason for a Ctrl-C, and MLflow retries for minutes."""
    def end() -> None:
        try:
            tracking.end_run(client, parent_run_id, tracking.KILLED)
        except Exception as exc:  # noqa: BLE001 - the resume line is said already; the log file has why
            logging.getLogger(__name__).warning("could not end the study's parent run KILLED: %s", exc)

    ending = threading.Thread(target=end, daemon=True)
    ending.start()
    ending.join(CLOSE_SECONDS)


def finish_done(client, parent_run_id: str) -> bool:
    """Whether the study's record says what follows its trials is done (read after a Ctrl-C, which may have come
    inside the very write that said so, the server having taken it)."""
    try:
        return client.get_run(parent_run_id).data.tags.get(studies.FINISH_TAG) == "done"
    except BaseException:  # the store cannot say, or another Ctrl-C came: the resume line is the safe advice
        return False


def finish(experiment, outcome, *, report: bool, promotion: bool, address: str | None = None,
           started: float | None = None) -> int:
    """What follows the trials: the study report, the confirmation of the best configurations, the final
    training of the chosen one, promotion; and, under a time budget, its plan against what happened."""
    started = started or time.perf_counter() - outcome.wall_seconds
    spent: dict[str, float] = {}  # the phases after the search (`timed`)
    interrupted = False
    try:
        return _finish(experiment, outcome, report, promotion, address, started, spent)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if outcome.plan is not None:
            print_budget(outcome, spent, time.perf_counter() - started, interrupted)


@contextlib.contextmanager
def timed(spent: dict, phase: str):
    """Add the block's seconds to `spent[phase]` however it ends: a Ctrl-C in the final training counts too."""
    mark = time.perf_counter()
    try:
        yield
    finally:
        spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - mark


def _finish(experiment, outcome, report: bool, promotion: bool, address, started: float, spent: dict) -> int:
    # The report is built on a thread while the confirmation and the final training run on Ray (the driver only
    # waits for them), so its seconds are off the path to the promoted model; it is joined before promotion.
    # An interrupted command leaves it unjoined (a daemon thread); a resume logs the report again.
    background = BackgroundReport(experiment, outcome.name) if report else None
    try:
        code = _promote_chosen(experiment, outcome, address, started, spent, background) if promotion else 0
        with timed(spent, "finish"):
            _join(background)  # where nothing was promoted, the report is what is left
    except KeyboardInterrupt:
        if background is not None:
            background.settle()
        raise
    return code


def _promote_chosen(experiment, outcome, address, started: float, spent: dict,
                    background: BackgroundReport | None) -> int:
    """Confirm the best configurations, train the chosen one's final model, and promote what comes of it."""
    searched = outcome.searched or experiment  # the trials' settings: a time budget's plan changes them
    if outcome.best is None:
        return 0
    with timed(spent, "finish"):
        client = tracking.make_client()
        promoted = client.get_run(outcome.parent_run_id).data.tags.get("promoted_run_id")
        if promoted:  # a resumed study that promoted before: its test split is not evaluated again
            _join(background)
            print(f"\nThe study promoted run {promoted} already; its test split is not evaluated again. "
                  f"To redo it: python -m cnnopt.promote --run-id {promoted}")
            return 0
    run_id, what = outcome.best["run_id"], f"the best trial (trial {outcome.best['trial_number']})"
    if searched.search.confirm_top:
        with timed(spent, "confirm"):
            confirmation = confirm_best(searched, outcome, address)
        if confirmation is not None:
            run_id, what = confirmation.promote_run_id, f"trial {confirmation.chosen.trial_number}'s configuration"
    if (outcome.plan.final if outcome.plan is not None else experiment.search.final_epochs):
        with timed(spent, "final"):
            deadline = 0.0
            if outcome.plan is not None:  # where the plan's finish begins (the report is built meanwhile)
                deadline = time.time() + outcome.plan.final_deadline - (time.perf_counter() - started)
            final = final_training(experiment, outcome, run_id, what, deadline, address)
        if final is not None:
            run_id, what = final.run_id, f"the final training of {what}"
    with timed(spent, "finish"):
        _join(background)
        print(f"\npromoting {what}...", flush=True)
        try:
            print_promotion(promote(experiment, run_id=run_id))  # on the data the run trained on
        except NotLearnt as exc:  # a retry would refuse again
            print(f"error: not promoted: {exc}", file=sys.stderr)
            return 1
        except UsageError as exc:  # the study itself is recorded; say what failed and how to retry
            print(f"error: promotion failed: {exc}; retry with python -m cnnopt.promote --run-id {run_id}",
                  file=sys.stderr)
            return 1
    return 0


def _join(background: BackgroundReport | None) -> None:
    if background is not None:
        background.join()


def final_training(experiment, outcome, run_id: str, what: str, deadline: float, address: str | None):
    """Train the chosen configuration once more (`cnnopt.study.final`), print and record what came of it."""
    search = experiment.search
    epochs = "the epochs the time budget leaves" if deadline else f"{search.final_epochs} epochs"
    data = "the train split" if search.final_data == "train" else "train + val"
    print(f"\nfinal training of {what}: {epochs}, on a whole node, on {data}...", flush=True)
    final = train_final(experiment, outcome.name, run_id, deadline=deadline, address=address)
    if isinstance(final, str):
        print(f"  no final model: {final}")
        return None
    keys = dict.fromkeys((experiment.metric, "val_accuracy", "train_accuracy"))  # the one it is selected by first
    shown = "  ".join(f"{key} {final.metrics[key]:.4f}" for key in keys if key in final.metrics)
    print(f"  {final.epochs} epochs (its trial had {final.trial_epochs}), {final.status}: {shown}"
          + ("  (trained before this resume: not trained again)" if final.recorded_before else ""))
    print(f"  MLflow run {final.run_id}")
    record_choice(outcome.parent_run_id, {"final_epochs": final.epochs}, {"final_run_id": final.run_id})
    return final


def print_budget(outcome, spent: dict, total: float, interrupted: bool = False) -> None:
    """A time budget's plan against what happened, printed and logged on the study's parent run. After a
    Ctrl-C the phase it cut short shows the seconds it ran, and the later ones none. A resume after the
    search shows the phases it ran; on the parent each phase's seconds are summed over the study's commands
    (`record_budget`): the search's stay those it took."""
    plan = outcome.plan
    planned = {"start": plan.started, "search": plan.search, "confirm": plan.confirm, "final": plan.final,
               "finish": plan.finish}
    seconds = budget_seconds(outcome, spent, total)
    resumed = ""
    if "budget_search_seconds" not in seconds:
        del planned["search"]
        resumed = f", resumed after its search: {sum(planned.values()) / 60:.1f} min planned"
    print(f"\ntime budget {plan.budget / 60:g} min{resumed}, used {total / 60:.1f} min"
          f"{', interrupted' if interrupted else ''} (planned / actual seconds):")
    for phase in planned:
        print(f"  {phase:8s}{planned[phase]:6.0f} / {seconds[f'budget_{phase}_seconds']:4.0f}")
    record_budget(outcome.parent_run_id, seconds)


def budget_seconds(outcome, spent: dict, total: float) -> dict[str, float]:
    """This command's seconds by phase, as the parent run's `budget_<phase>_seconds` and `budget_used_seconds`
    (`record_budget` sums them over the study's commands): the search's are the study's run
    (`outcome.wall_seconds`), the later phases' what `spent` holds of them. A resume of a study whose search
    had ended searched nothing: it has no search seconds, whatever its plan (one recorded, or made again)."""
    actual = {"start": outcome.plan.started, "search": outcome.wall_seconds, "confirm": spent.get("confirm", 0.0),
              "final": spent.get("final", 0.0), "finish": spent.get("finish", 0.0)}
    if outcome.search_ended:  # a plan goes on after its search (`Plan.resumed`) only where the search had ended
        del actual["search"]
    return {**{f"budget_{phase}_seconds": value for phase, value in actual.items()}, "budget_used_seconds": total}


def confirm_best(experiment, outcome, address: str | None):
    """Re-train the best configurations with new seeds, print mean ± std, record and return the choice."""
    search, metric = experiment.search, experiment.metric
    print(f"\nconfirming the {counted(search.confirm_top, 'best configuration').removeprefix('1 ')} with "
          f"{counted(search.confirm_seeds, 'new seed')} each "
          f"(--no-confirm skips this)...", flush=True)
    confirmation = confirm(experiment, outcome.name, address)
    if confirmation is None:
        return None
    for candidate in confirmation.candidates:
        mark = "  <- chosen" if candidate is confirmation.chosen else ""
        spread = f" ± {candidate.std:.4f}" if len(candidate.values) > 1 else ""
        alone = " (one seed: no spread measured)" if len(candidate.values) == 1 else ""
        print(f"  trial {candidate.trial_number:3d}: {metric} {candidate.mean:.4f}{spread} over "
              f"{counted(len(candidate.values), 'new seed')}{alone} (the trial itself: {candidate.value:.4f}){mark}")
    # Where a final training follows, it trains this run's configuration and seed, and its model is promoted.
    print(f"  chosen run {confirmation.promote_run_id}: {confirmation.reason}")
    record_choice(outcome.parent_run_id, figures(tracking.make_client(), confirmation, metric),
                  {"confirmed_trial": confirmation.chosen.trial_number, "confirmed_run_id": confirmation.promote_run_id,
                   "confirmation": confirmation.reason})
    return confirmation


SETTLE_SECONDS = 15.0  # the most a Ctrl-C waits for the report's thread (it takes 5-10 s in all)


class BackgroundReport:
    """The study report (`log_report`), logged to the parent run on a thread of its own; `join` waits
    for it and prints its lines: the figures, the importances, the edges of the space, or a warning
    saying how to retry where it failed (the study is recorded whatever happens here)."""

    def __init__(self, experiment, name: str):
        self.lines: list[tuple[str, bool]] = []  # (text, to stderr)
        self.joined = False
        # A daemon: a Ctrl-C that ends the command does not wait for it (a resume logs the report again).
        self.thread = threading.Thread(target=self._build, args=(experiment, name), name="cnnopt-report", daemon=True)
        self.thread.start()

    def _build(self, experiment, name: str) -> None:
        try:
            report = log_report(experiment, name)
        except Exception as exc:
            self.lines = [(f"warning: the study report failed ({type(exc).__name__}: {exc}); retry with "
                           f"python -m cnnopt.report --study {name}", True)]
            return
        importance = (f"; importance {', '.join(f'{k} {v:.2f}' for k, v in list(report.importances.items())[:3])}"
                      if report.importances else "")
        self.lines = ([("", False), (f"report: {len(report.figures)} figures and report.md on the study's parent run "
                                     f"(report/){importance}", False)]
                      + [(f"edge of the space: {line}", False) for line in report.edges])

    def settle(self) -> None:
        """After a Ctrl-C: give the report up to `SETTLE_SECONDS` to end, so that the interpreter does not shut down
        while the thread draws (in matplotlib's C code at exit, the process aborted with exit 134 once in three
        tries). A second Ctrl-C stops the wait."""
        if not self.thread.is_alive():
            return
        print(f"\ninterrupted: waiting up to {SETTLE_SECONDS:.0f}s for the study report to end (Ctrl-C again stops "
              "now)", file=sys.stderr, flush=True)
        try:
            self.thread.join(SETTLE_SECONDS)
        except KeyboardInterrupt:
            pass

    def join(self) -> None:
        """Wait for the report and print its lines, once (later calls do nothing)."""
        if self.joined:
            return
        self.thread.join()
        self.joined = True
        for text, to_stderr in self.lines:
            print(text, file=sys.stderr if to_stderr else sys.stdout, flush=True)


def print_summary(experiment, outcome) -> None:
    counts = outcome.counts
    shown = [f"{counts.get(trials.COMPLETED, 0)} {trials.COMPLETED}"] + [
        f"{counts.get(status, 0)} {status}" for status in (trials.FAILED, trials.PRUNED, trials.DIVERGED)] + [
        f"{counts[status]} {status}" for status in (trials.STOPPED, trials.INTERRUPTED, trials.ABANDONED)
        if counts.get(status)]
    print(f"\n{outcome.name}: {', '.join(shown)}"
          + f" in {outcome.wall_seconds:.0f}s")
    spent = sum(outcome.trial_seconds.values())
    if spent:  # where the trials' time went: what pruning, failures and cut-short trials cost
        shares = sorted(outcome.trial_seconds.items(), key=lambda item: -item[1])
        print(f"trial time {spent:.0f}s: " + ", ".join(f"{status} {seconds / spent:.0%}" for status, seconds in shares))
    best = outcome.best
    if best:
        metrics = best["metrics"]
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("val_accuracy", "val_loss", "train_accuracy")
                          if k in metrics and not math.isnan(metrics[k]))
        ties = best.get("ties") or []
        tied = (f"  (tied on {experiment.metric} with trial{'s' * (len(ties) > 1)} {', '.join(map(str, ties))}: the "
                "lowest number is named)") if ties else ""
        print(f"best trial {best['trial_number']} (epoch {int(metrics.get('epoch', 0))}): {shown}{tied}")
        print("  " + "  ".join(f"{k}={format_value(v)}" for k, v in best["params"].items()))  # as the trial lines
        print(f"  MLflow run {best['run_id']}")
    else:
        print("no trial completed")
    print(f"Browse the study: {tracking.ui_command()}")


if __name__ == "__main__":
    run(main)
