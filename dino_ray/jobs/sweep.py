"""``dino-ray sweep``: a Ray Tune sweep of config keys, its table, and the best trial."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dino_ray.core.args import arg


@dataclass
class SweepArgs:
    spec: Optional[str] = arg(None, "a shipped sweep's name (cifar10_cpu) or a sweep YAML file", positional=True)
    overrides: list[str] = arg(help="key=value overrides of the base config, e.g. epochs=2", factory=list,
                               positional=True)
    resume: Optional[str] = arg(None, "continue the interrupted sweep NAME")
    storage_path: Optional[str] = arg(None, "where sweeps live (default: the file's, else outputs/sweeps)")


def sweep_job(args: SweepArgs) -> list[dict[str, Any]]:
    """Run (or resume) the sweep and print its table and best trial; every trial failing is an error."""
    from dino_ray.platform.sweep import format_table, load_sweep, resume_sweep, run_sweep

    if args.resume:
        spec, rows = resume_sweep(args.resume, args.storage_path or "outputs/sweeps")
    else:
        if not args.spec:
            raise ValueError("give a sweep (a shipped name such as cifar10_cpu, or a YAML file) or --resume NAME")
        spec = load_sweep(args.spec, args.overrides)
        spec.storage_path = args.storage_path or spec.storage_path
        rows = run_sweep(spec)
    print(format_table(spec, rows))
    if all(row["status"] == "ERROR" for row in rows):
        raise ValueError(f"every trial of sweep '{spec.name}' failed: see the errors above and "
                         f"{spec.storage_path}/{spec.name}/tune")
    best = rows[0]
    print(f"best: {best['trial']} ({spec.metric} {best[spec.metric]:.2f}); checkpoint: {best['checkpoint']}")
    return rows
