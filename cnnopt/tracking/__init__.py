"""MLflow lives here: the only package that writes to the tracking store.

store     - where the store is, experiments, runs, batched writes (the helpers everything else uses)
recorder  - a study's record as it is written: parent run, child run per trial (`StudyRecorder`),
            the confirmation runs and their outcome
writer    - the driver's background thread that performs a study's writes in order
studies   - a study read back: parent, trials, the best trial, the settings a resume starts from
runs      - one standalone run (`cnnopt.train`, `cnnopt.lr_finder`)
provenance - MLflow's source tags (command, git commit, version), the dataset input of a run, its duplicates
registry  - promotion's records: test metrics, exported files, the registered model and its alias
reports   - the study report's files, metrics and tags on the parent run
comparisons - a strategy comparison's run, with its studies nested under it
"""

from cnnopt.tracking.store import (EPOCH_METRICS, FAILED, FINISHED, KILLED, KIND_TAG, PARENT_TAG, STUDY_TAG,  # noqa: F401
                                   TRIAL_TAG, best_metrics, check_store, check_writable, require_store, data_params, end_run, experiment_id, hyperparameters,
                                   log, log_experiment_file, make_client, param_value, per_name_metrics, start_run, tracking_uri,
                                   ui_command)
from cnnopt.tracking.provenance import duplicate_tags, log_dataset, split_digest, splits_digest, train_dataset  # noqa: F401,E402
