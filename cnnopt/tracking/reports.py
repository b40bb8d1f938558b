"""The study report's records on the study's parent run: files under `report/`, metrics and tags."""

from __future__ import annotations

from pathlib import Path

from cnnopt.tracking.store import log, make_client

ARTIFACT_PATH = "report"


def log_report(parent_run_id: str, files: list[Path], *, metrics: dict, step: int, tags: dict,
               replace_prefix: str) -> str:
    """Log the report's files, metrics (at `step`) and tags; tags starting with `replace_prefix` that the
    report no longer sets are removed (an earlier report's finding that no longer holds).

    Returns:
        The artifact URI of the run's `report/` folder.
    """
    client = make_client()
    for path in files:
        client.log_artifact(parent_run_id, str(path), artifact_path=ARTIFACT_PATH)
    for key in client.get_run(parent_run_id).data.tags:
        if key.startswith(replace_prefix) and key not in tags:
            client.delete_tag(parent_run_id, key)
    log(client, parent_run_id, metrics=metrics, step=step, tags=tags)
    return f"{client.get_run(parent_run_id).info.artifact_uri}/{ARTIFACT_PATH}"
