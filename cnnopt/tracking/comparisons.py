"""A strategy comparison's record: one 'comparison' run, its studies' parent runs nested under it."""

from __future__ import annotations

from pathlib import Path

from cnnopt.experiment.config import Experiment
from cnnopt.tracking.store import KIND_TAG, PARENT_TAG, end_run, experiment_id, log, make_client, start_run

COMPARISON_TAG = "cnnopt.comparison"
ARTIFACT_PATH = "comparison"


def comparison_exists(experiment: Experiment, name: str) -> bool:
    """Whether the MLflow experiment already holds a comparison of this name."""
    client = make_client()
    if client.get_experiment_by_name(experiment.name) is None:
        return False
    found = client.search_runs([experiment_id(client, experiment.name)],
                               f"tags.`{KIND_TAG}` = 'comparison' and tags.`{COMPARISON_TAG}` = '{name}'", max_results=1)
    return bool(found)


def start_comparison(experiment: Experiment, name: str, *, params: dict, tags: dict) -> str:
    """A RUNNING comparison run (run name = `name`) with its settings; returns its id."""
    client = make_client()
    run_id = start_run(client, experiment, name, tags={**tags, KIND_TAG: "comparison", COMPARISON_TAG: name})
    log(client, run_id, params=params)
    return run_id


def nest_study(run_id: str, study_parent_run_id: str, name: str) -> None:
    """Put a study's parent run under the comparison run (the UI shows comparison > study > trials)."""
    log(make_client(), study_parent_run_id, tags={PARENT_TAG: run_id, COMPARISON_TAG: name})


def log_comparison(run_id: str, files: list[Path], *, curves: dict[str, list[float]], metrics: dict,
                   tags: dict) -> str:
    """Log the comparison's files (under `comparison/`), its curves and its summary.

    Args:
        curves: metric name -> values after trial 1, 2, ... (logged with step = the trial count; NaN skipped).
        metrics: single values, logged at step 0.
    Returns:
        The artifact URI of the run's `comparison/` folder.
    """
    client = make_client()
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_PATH)
    length = max((len(values) for values in curves.values()), default=0)
    for step in range(1, length + 1):
        points = {key: values[step - 1] for key, values in curves.items()
                  if step <= len(values) and values[step - 1] == values[step - 1]}
        if points:
            log(client, run_id, metrics=points, step=step)
    log(client, run_id, metrics=metrics, tags=tags)
    return f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT_PATH}"


def end_comparison(run_id: str, status: str) -> None:
    end_run(make_client(), run_id, status)
