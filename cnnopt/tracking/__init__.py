"""MLflow lives here: the only package that writes to the tracking store."""

from cnnopt.tracking.store import *  # noqa: F401,F403
