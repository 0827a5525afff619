"""The shipped recipes as package data: the paper's runs, the CPU recipes, and sweep files (``sweeps/``).
A command takes a recipe by its name (``--config cifar10_cpu``) or a YAML file's path."""
