"""GPU work of the factual-recall chapter (nbs/08_recall.ipynb); results go to results/recall/.

    python scripts/recall_gpu.py test              # tests/test_recall.py on the GPU machine, ~1 min
    python scripts/recall_gpu.py full --seed 0     # train the 6-layer model, analyse every relation, ≤ 8 min (estimated, not measured)
    python scripts/recall_gpu.py full --steps 1000 # a cheaper run

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
from lmcourse.recall import recall_experiment_config, run_recall_experiment


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["test", "full"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script only runs on a GPU machine")
    if args.what == "test":
        sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_recall.py"]))
    cfg = recall_experiment_config()
    if args.steps: cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=args.steps))
    start = time.perf_counter()
    result = run_recall_experiment(cfg, seed=args.seed)
    result["seconds"] = time.perf_counter() - start
    print("saved", save_result("recall", f"full_seed{args.seed}", result), f"{result['seconds']:.0f} s")
    for r in result["relations"]:
        l, h = r["top_head"]
        print(f"{r['relation']:10s} accuracy {r['accuracy']:.3f} top head {l}.{h} effect {r['head_effect'][l][h]:+.2f} "
              f"all heads {r['all_heads_effect']:+.2f} lens P(answer) {[round(x, 3) for x in r['lens']['p_answer']]}")


if __name__ == "__main__":
    main()
