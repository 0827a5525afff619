"""The platform: Ray (sessions, the Ray Train wrapper, Ray Data input, feature tasks, the k-NN monitor, sweeps)
and MLflow (tracking), and where checkpoints come from. The one layer that imports ``ray`` and ``mlflow``;
it builds on the core and the evaluations and imports no job."""
