"""The core: DINO itself in plain PyTorch (config, models, loss, optimisation, data, the loop, checkpoints).

It imports neither Ray, MLflow, the evaluations nor the platform (checked by import-linter, ``make test-fast``):
it runs in a pytest process, under ``torchrun`` or on a Ray Train worker alike.
"""
