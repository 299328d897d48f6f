"""GPU work of the DrICL chapter (nbs/09_dricl.ipynb); results go to results/dricl/.

    python scripts/dricl_gpu.py test              # tests/test_dricl.py on the GPU (the fused backend on CUDA), ~1 min
    python scripts/dricl_gpu.py full --seed 0     # pretrain + 11 fine-tuned arms + greedy evaluation, ≤ 8 min (estimated)
    python scripts/dricl_gpu.py full --arms nll dricl --finetune-steps 200    # a cheaper subset

Needs only torch, triton and the package (`pip install --no-deps --no-build-isolation -e .`)."""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")

import argparse
import dataclasses
import subprocess
import sys
import time

import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET when no GPU is visible)
import torch

from lmcourse.bench import save_result
from lmcourse.dricl import ARMS, dricl_experiment_config, run_dricl_experiment


def full(budget, seed: int = 0):
    "The chapter's full experiment (pretrain, the fine-tuned arms, greedy evaluation), one seed."
    result = run_dricl_experiment(dricl_experiment_config(), seed=seed)
    print("saved", save_result("dricl", f"full_seed{seed}", result))
    return [{"metric": f"{arm} held-out accuracy (last)", "measured": round(r["held_out"]["accuracy"][-1], 3),
             "target": "dricl > nll (paper)"} for arm, r in result["arms"].items()]


PARTS = {"full": (480, full)}   # make gpu-run CHAPTER=dricl; its kernel tests are in make gpu's `tests` part


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["test", "full"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=None)
    ap.add_argument("--finetune-steps", type=int, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script only runs on a GPU machine")
    if args.what == "test":
        sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_dricl.py"]))
    cfg = dricl_experiment_config()
    if args.arms: cfg = dataclasses.replace(cfg, arms=tuple(args.arms))
    if args.finetune_steps: cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, steps=args.finetune_steps))
    start = time.perf_counter()
    result = run_dricl_experiment(cfg, seed=args.seed)
    result["seconds"] = time.perf_counter() - start
    print("saved", save_result("dricl", f"full_seed{args.seed}", result), f"{result['seconds']:.0f} s")
    for arm, r in result["arms"].items():
        print(f"{arm:28s} in-domain", [round(a, 3) for a in r["in_domain"]["accuracy"]],
              "held-out", [round(a, 3) for a in r["held_out"]["accuracy"]])


if __name__ == "__main__":
    main()
