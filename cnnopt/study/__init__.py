"""Studies on Ray Tune: the runner, the strategies, the trainable (Ray adapter) and the MLflow callback."""
