"""The tracking store: where it is, experiments, runs, and batched writes of params, metrics and tags.

All writes go through `MlflowClient.log_batch` (63x cheaper per metric than `log_metric` on SQLite
here) and happen in the driver process only, so parallel trials never race on the store.
"""

from __future__ import annotations

import contextlib
import logging
import dataclasses
import math
import os
import re
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnopt.cli import interrupts_deferred
from cnnopt.errors import UsageError
from cnnopt.experiment.config import DataConfig, Experiment, TrainConfig
from cnnopt.tracking.provenance import source_tags

PARENT_TAG = "mlflow.parentRunId"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite file `mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def ui_command() -> str:
    """How to browse the store: a tracking server's own address, or the `mlflow ui` command for a SQLite file."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if path.parent == Path.cwd():
            uri = f"sqlite:///{path.name}"
    return f"mlflow ui --backend-store-uri {uri}"


def make_client(write: bool = True) -> MlflowClient:
    """A client of the tracking store, checked once per store to fail in seconds (not after MLflow's
    retries) where it cannot be written (or, with write=False, for a command that only reads it: a results
    store on a read-only mount, say, read) or reached."""
    uri = tracking_uri()
    first = (uri, True) not in _checked_stores and (uri, write) not in _checked_stores  # a write check serves reads
    if first:
        check_store(uri, create=write, write=write)
    try:
        # The first client of a SQLite store creates or migrates its database: a Ctrl-C in the middle would
        # leave it broken for good (seen: "table _alembic_tmp_latest_metrics already exists"), so it waits.
        with interrupts_deferred() if first else contextlib.nullcontext():
            client = MlflowClient(tracking_uri=uri)
        if first and not uri.lower().startswith(("sqlite:", "http://", "https://")):  # a Ctrl-C may cut it short
            with _quiet("mlflow"):  # its warnings on the way: the error below says it (and leaves no log file)
                client.search_experiments(max_results=1)  # databricks without its credentials fails first here
    except MlflowException as exc:  # a scheme MLflow does not take, its retired plain-folder store, no credentials
        why = exc.message.strip().splitlines()[0].split(". ")[0].strip()
        raise UsageError(f"the MLflow tracking URI {uri} cannot be used ({why}); "
                         "set MLFLOW_TRACKING_URI to a sqlite:///PATH/mlflow.db or an http:// server") from None
    except ModuleNotFoundError as exc:  # a database whose driver is not installed: postgresql://, mysql://
        package = DRIVER_PACKAGES.get((exc.name or "").split(".")[0], exc.name)
        raise UsageError(f"the MLflow store {uri} needs the Python package {package}, which is not installed here: "
                         f"pip install {package}, or set MLFLOW_TRACKING_URI to a sqlite:///PATH/mlflow.db or an "
                         "http:// server") from None
    except Exception as exc:  # SQLAlchemy's own: a database MLflow cannot open or bring up to date
        if not uri.startswith("sqlite:///"):
            raise
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fix = ("its creation was cut short (a migration's scratch table is left): if it holds no runs yet, delete "
               "it and run again, else set MLFLOW_TRACKING_URI to another store" if "_alembic_tmp_" in why else
               "if another command is creating it now, wait for it and retry; else check the file, or set "
               "MLFLOW_TRACKING_URI to another store")
        raise UsageError(f"the MLflow store {uri} cannot be opened ({why}); {fix}") from None
    _checked_stores.add((uri, write))
    return client


_checked_stores: set[tuple[str, bool]] = set()  # (uri, checked for writing)


@contextlib.contextmanager
def _quiet(name: str):
    """The logger `name` says only errors during the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "pymysql", "pymssql": "pymssql", "pyodbc": "pyodbc"}  # module -> what pip installs


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH[?options]` URI; None for any other store."""
    return Path(uri[len("sqlite:///"):].partition("?")[0]) if uri.startswith("sqlite:///") else None


def missing_artifacts(artifact_uri: str) -> str:
    """Where a run's artifacts should be and are not, said for a message ("" where they are there, or not on this
    machine's disk to look at): an mlruns/ folder deleted or moved, its database kept. A run's own folder is made
    with its first file (a failed trial has none), so it is the experiment's folder above it that must be gone."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme.lower() not in ("", "file") or len(parsed.scheme) == 1:  # a server's, a bucket's (C: a drive)
        return ""
    folder = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else artifact_uri)
    experiment = folder.parents[1] if len(folder.parents) > 1 else folder  # mlruns/<experiment>/<run>/artifacts
    if os.path.exists(experiment):
        return ""
    return (f" (its files are missing: the artifact folder {folder} is not there; the store's database outlived its "
            "artifacts, moved or deleted)")


def require_store(what: str) -> None:
    """For a command that only looks `what` up (a study, a run, a registered model): a SQLite store that is not
    there is one line, where MLflow would create an empty one (and say so on the console) and find nothing."""
    uri = tracking_uri()
    database = sqlite_file(uri)
    if database is not None and not database.exists():
        raise UsageError(f"no MLflow store at {uri} to find {what} in: run from the folder the study ran in "
                         "(where its mlflow.db is), or set MLFLOW_TRACKING_URI to its store")


def check_store(uri: str, timeout: float = 5.0, create: bool = True, write: bool = True) -> None:
    """Raise a UsageError naming the store if a local one cannot be written (with write=False: read) or a server
    does not answer; a local store's folders are made, unless create=False (a check that leaves nothing behind)."""
    fix = "set MLFLOW_TRACKING_URI to a writable sqlite:///PATH/mlflow.db or a reachable http:// server"
    if uri.lower().startswith("sqlite:"):
        if uri.partition("?")[0] in ("sqlite:", "sqlite://", "sqlite:///") or ":memory:" in uri or "mode=memory" in uri:
            raise UsageError(f"MLFLOW_TRACKING_URI = {uri} is a database in memory: nothing recorded there outlives "
                             "the command; name a file, with three slashes: sqlite:///mlflow.db (or "
                             "sqlite:////abs/path.db)")
        if not uri.startswith("sqlite:///"):  # sqlite://mlflow.db: SQLAlchemy's traceback
            raise UsageError(f"MLFLOW_TRACKING_URI = {uri} is no SQLite file's address: it takes three slashes before "
                             "the path, sqlite:///mlflow.db (relative) or sqlite:////abs/path/mlflow.db")
    database = sqlite_file(uri)
    if database is not None and not write:
        if not os.access(database, os.R_OK):
            raise UsageError(f"the MLflow store {uri} cannot be read (no such file, or no permission); {fix}")
    elif database is not None:
        check_writable(database.parent, f"the MLflow store {uri}", fix, create)
        if database.exists():
            try:
                with open(database, "ab"):
                    pass
            except OSError as exc:
                raise UsageError(f"the MLflow store {uri} cannot be written ({exc.strerror or exc}); {fix}") from None
        check_writable(Path("mlruns").resolve(), "the MLflow artifact folder", "run from a writable folder", create)
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        except (OSError, ValueError) as exc:
            raise UsageError(f"the MLflow tracking server {uri} does not answer ({getattr(exc, 'reason', exc)}); "
                             "start it or fix MLFLOW_TRACKING_URI") from None


def store_answers(timeout: float = 2.0) -> bool:
    """Whether the tracking server answers its health check within `timeout` seconds now; a local store: True
    (its failures are not an absence)."""
    uri = tracking_uri()
    if not uri.lower().startswith(("http://", "https://")):
        return True
    try:
        check_store(uri, timeout=timeout, create=False, write=False)
    except UsageError:
        return False
    return True


def check_writable(folder: Path, what: str, fix: str, create: bool = True) -> None:
    """Create `folder` if needed and write a scratch file in it (as root, permission bits say nothing);
    with create=False nothing is left behind: a missing folder's nearest existing parent is tried instead."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = next(parent for parent in (folder, *folder.parents) if parent.exists())
            if not folder.is_dir():
                raise NotADirectoryError(20, "Not a directory")
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{what} cannot be written ({exc.strerror or exc}: {folder}); {fix}") from None


_experiment_ids: dict[tuple[str, str], str] = {}


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the MLflow experiment `name`, created if missing (looked up once per store)."""
    key = (client.tracking_uri, name)
    if key not in _experiment_ids:
        _experiment_ids[key] = _find_or_create_experiment(client, name)
    return _experiment_ids[key]


def _find_or_create_experiment(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    return client.create_experiment(name)


def hyperparameters(config: TrainConfig, names: list[str] | None = None) -> dict[str, str]:
    """Hyperparameters as MLflow params by their declared names (all, or just `names`)."""
    values = dataclasses.asdict(config)
    return {name: str(values[name]) for name in (names or values)}


def data_params(config: DataConfig) -> dict[str, str]:
    return {f"data.{key}": str(value) for key, value in dataclasses.asdict(config).items()}


def log(client: MlflowClient, run_id: str, *, params: dict | None = None, metrics: dict | None = None,
        step: int = 0, tags: dict | None = None) -> None:
    """One batched write of params, metrics (at `step`) and tags."""
    now = int(time.time() * 1000)
    metric_list = [Metric(key, float(value), now, step) for key, value in (metrics or {}).items()]
    param_list = [Param(key, str(value)[:6000]) for key, value in (params or {}).items()]
    tag_list = [RunTag(key, str(value)) for key, value in (tags or {}).items()]
    for first in range(0, max(len(metric_list), len(param_list), len(tag_list), 1), 100):
        client.log_batch(run_id, metrics=metric_list[first:first + 100], params=param_list[first:first + 100],
                         tags=tag_list[first:first + 100])


METRIC_KEY_LENGTH = 250  # MLflow's longest metric name
REFUSED_IN_KEYS = re.compile(r"[^/\w.\- :]")  # MLflow's names: word characters, / . - space and colon


def per_name_metrics(prefix: str, values: dict[str, float]) -> dict[str, float]:
    """Metrics keyed `prefix` + a name each (a class's folder name): a character MLflow refuses in a key
    (an apostrophe, a bracket, a plus) becomes `_`, a key is cut to MLflow's length, and a name that would
    then collide with an earlier one gets its position appended, so every value is kept."""
    keyed: dict[str, float] = {}
    for position, (name, value) in enumerate(values.items()):
        key = base = (prefix + REFUSED_IN_KEYS.sub("_", str(name)))[:METRIC_KEY_LENGTH]
        tries = 0
        while key in keyed:  # each try another key, even where the cut to MLflow's length would repeat one
            tries += 1
            suffix = f"_{position}" if tries == 1 else f"_{position}_{tries}"
            key = base[:METRIC_KEY_LENGTH - len(suffix)] + suffix
        keyed[key] = value
    return keyed


def best_metrics(metrics: dict) -> dict[str, float]:
    """The best epoch's metrics under `best_` names, so runs compare on their best epoch."""
    return {f"best_{key}": value for key, value in metrics.items() if isinstance(value, (int, float))
            and not math.isnan(float(value))}


def start_run(client: MlflowClient, experiment: Experiment, run_name: str, *, parent_run_id: str | None = None,
              tags: dict | None = None, start_time: int | None = None) -> str:
    """Create a RUNNING run in the experiment's MLflow experiment and return its id.

    Every run carries MLflow's source tags (the command, LOCAL, the git commit) and cnnopt's version.
    `start_time` (ms since the epoch) is when what the run records began, where the write comes later (a
    queued write to a slow store); None: now.
    """
    # Tag values as strings: SQLite takes an int, a tracking server's REST API refuses it (TypeError).
    all_tags = {"mlflow.runName": run_name, **source_tags(), **{key: str(value) for key, value in (tags or {}).items()}}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id(client, experiment.name), run_name=run_name, tags=all_tags,
                            start_time=start_time)
    return run.info.run_id


def end_run(client: MlflowClient, run_id: str, status: str, end_time: int | None = None) -> None:
    """End a run as FINISHED, FAILED or KILLED; at `end_time` (ms since the epoch; None: now)."""
    client.set_terminated(run_id, status=status, end_time=end_time)


def log_experiment_file(client: MlflowClient, run_id: str, experiment: Experiment) -> None:
    if experiment.path and Path(experiment.path).is_file():
        client.log_artifact(run_id, experiment.path, artifact_path="experiment")


FINISHED, FAILED, KILLED = (RunStatus.to_string(s) for s in (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED))


EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds", "images_per_second")
STUDY_TAG, TRIAL_TAG, KIND_TAG = "cnnopt.study", "trial_id", "cnnopt.kind"


def param_value(text: str | None, kind: type):
    """An MLflow param (a string) as its declared type: bool, int, float or str."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    if kind is bool:
        return text == "True"
    return kind(text)
