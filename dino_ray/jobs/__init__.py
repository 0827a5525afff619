"""The evaluation jobs behind ``dino-ray eval-* | visualize-attention | attention-video``: one module a job.

Each takes one typed, validated arguments object (``<Job>Args``, field names = the reference's flags),
resolves its weights (file, MLflow run id, hub name: ``dino_ray.platform.checkpoints``), calls the pure
evaluation functions of ``dino_ray.eval``, does its work on Ray where that helps (k-NN features in
Ray tasks, the linear probe on the Ray Train wrapper) and records an MLflow run nested under the
pretraining run the weights came from (``dino_ray.jobs.common``).
"""
