"""Training-step throughput (images/s) with and without the speed options, saved as JSON.

Each measurement runs the real step (``dino_ray.core.train.step``) through ``train_one_epoch`` (student forward and
backward on all crops, teacher forward on the global crops, DINO loss, clipping, optimizer, EMA) on
synthetic crops of the configured sizes, so data loading is excluded. Variants:
- ``baseline``: every option off (explicit attention, the default optimizer kernels, eager mode, NCHW memory)
- a convolutional backbone (the CPU recipe): ``channels_last`` memory (its default), the same on 1 torch thread
  instead of all, plus torch's fused AdamW kernel, or plus ``torch.compile`` (inductor; first steps excluded)
- a ViT: ``sdpa`` (timm's fused scaled-dot-product attention), plus the fused AdamW kernel, plus ``torch.compile``

Usage: ``python benchmarks/train_step.py [--steps N] [--warmup N] [--skip-compile] [--out FILE]``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dino_ray.core.config import DINOConfig, build_config, load_config
from dino_ray.core.train.loop import build_schedules, train_one_epoch
from dino_ray.core.train.step import build_step

ROOT = Path(__file__).resolve().parents[1]

OFF = dict(fused_attn=False, fused_optimizer=False, torch_compile=False, channels_last=False)
CONV = {**OFF, "channels_last": True}  # the convolutional recipes' default
VARIANTS = {  # per setup: a convolutional backbone gains from other options than a ViT
    "cnn": {
        "baseline": OFF,
        "channels_last": CONV,
        "channels_last, 1 thread": {**CONV, "threads": 1},
        "channels_last+fused_adamw": {**CONV, "fused_optimizer": True},
        "channels_last+compile": {**CONV, "torch_compile": True},
    },
    "vit": {
        "baseline": OFF,
        "sdpa": {**OFF, "fused_attn": True},
        "sdpa+fused_adamw": {**OFF, "fused_attn": True, "fused_optimizer": True},
        "sdpa+fused_adamw+compile": {**OFF, "fused_attn": True, "fused_optimizer": True, "torch_compile": True},
    },
}


def synthetic_batch(cfg: DINOConfig) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    crops = [torch.randn(cfg.batch_size_per_gpu, 3, cfg.global_crops_size, cfg.global_crops_size) for _ in range(2)]
    crops += [torch.randn(cfg.batch_size_per_gpu, 3, cfg.local_crops_size, cfg.local_crops_size)
              for _ in range(cfg.local_crops_number)]
    return crops, torch.zeros(cfg.batch_size_per_gpu, dtype=torch.long), 0


def measure(cfg: DINOConfig, steps: int, warmup: int, threads: int) -> dict[str, float]:
    """images/s over ``steps`` training steps after ``warmup`` untimed ones (compilation, allocator), on
    ``threads`` torch threads."""
    torch.set_num_threads(threads)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    step = build_step(cfg, device, 1, warmup + steps)
    schedules = build_schedules(cfg, warmup + steps, 1)
    batch = synthetic_batch(cfg)

    def run(n: int, epoch: int) -> float:
        start = time.perf_counter()
        train_one_epoch(step, [batch] * n, schedules, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(warmup, 0)
    seconds = run(steps, 0)
    return {"images_per_s": round(steps * cfg.batch_size_per_gpu / seconds, 2),
            "s_per_step": round(seconds / steps, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vits-batch", type=int, default=4)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    parser.add_argument("--setups", default="cifar10_cpu,vit_small16_2x224_8x96",
                        help="which to measure; the others keep their figures in --out")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    setups = {
        "cifar10_cpu": load_config("cifar10_cpu"),
        "vit_small16_2x224_8x96": build_config(dict(arch="vit_small", patch_size=16, batch_size_per_gpu=args.vits_batch,
                                                    local_crops_number=8, drop_path_rate=0.1, epochs=1,
                                                    warmup_epochs=0)),
    }
    results: dict = {"machine": {"cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                                 "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                                 else platform.processor() or platform.machine(), "torch": torch.__version__},
                     "steps": args.steps, "warmup_steps": args.warmup, "setups": {}}
    if Path(args.out).exists():
        results["setups"] = json.loads(Path(args.out).read_text())["setups"]
    for name, base in setups.items():
        if name not in args.setups.split(","):
            continue
        rows = {}
        for variant, options in VARIANTS["vit" if base.arch.startswith("vit") else "cnn"].items():
            if options["torch_compile"] and args.skip_compile:
                continue
            options = dict(options)
            count = options.pop("threads", threads)
            cfg = build_config({**base.to_dict(), **options, "epochs": 1, "warmup_epochs": 0})
            rows[variant] = measure(cfg, args.steps, args.warmup, count)
            rows[variant]["speedup_vs_baseline"] = round(rows[variant]["images_per_s"] /
                                                         rows["baseline"]["images_per_s"], 3)
            print(f"{name:26s} {variant:28s} {rows[variant]['images_per_s']:8.2f} images/s "
                  f"({rows[variant]['s_per_step']:.3f} s/step, x{rows[variant]['speedup_vs_baseline']})", flush=True)
        results["setups"][name] = {"batch_size": base.batch_size_per_gpu,
                                   "crops": f"2x{base.global_crops_size} + {base.local_crops_number}x"
                                            f"{base.local_crops_size}", "variants": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
