"""GPU work of the Autonomy-of-Experts chapter (nbs/05_aoe.ipynb); results go to results/aoe/.

    python scripts/aoe_gpu.py test            # the kernel tests on the GPU (bf16 included)
    python scripts/aoe_gpu.py bench           # layer benchmark, ~3 min on one H100
    python scripts/aoe_gpu.py lm --seed 0     # AoE vs router-MoE LMs at the full size, ~8 min on one H100

Needs only torch, triton, tokenizers and the package (`pip install --no-deps --no-build-isolation -e .`)."""
import argparse
import subprocess
import sys

import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET when no GPU is visible)
import torch

from lmcourse.aoe import LM_SIZES, benchmark_summary, layer_benchmark, lm_data, lm_run
from lmcourse.bench import save_result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["test", "bench", "lm"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override the full run's step count")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script only runs on a GPU machine")
    if args.what == "test":
        sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-x", "-q", "tests/test_aoe.py"]))
    if args.what == "bench":
        result = layer_benchmark()
        print(save_result("aoe", "layer_benchmark", result))
        for row in benchmark_summary(result): print(row)
        for row in result["rows"]:
            if row.get("error"): print("failed:", row["provider"], row["shape"], row["mode"], row["error"])
    if args.what == "lm":
        size = dict(LM_SIZES["full"])
        if args.steps: size["steps"] = args.steps
        data = lm_data(size)
        runs = [lm_run(kind, size, seed=args.seed, data=data, progress=True) for kind in ("aoe", "moe")]
        print(save_result("aoe", f"lm_seed{args.seed}", {"runs": runs}))
        for r in runs:
            print(r["kind"], f"val loss {r['final_val_loss']:.4f}", f"{r['tokens_per_s']:.0f} tok/s",
                  "load entropy", [round(v, 3) for v in r["load_entropy"]],
                  "selection entropy", [round(v, 3) for v in r["selection_entropy"]])


if __name__ == "__main__":
    main()
