"""GPU results of the foundations chapter: the RMSNorm benchmark sweep and the full baseline run.

Run on a GPU machine from the repository root (no nbdev or Jupyter needed there):
    pip install --no-deps --no-build-isolation -e .
    python scripts/foundations_gpu.py [bench|full|all]
    torchrun --nproc_per_node=N scripts/foundations_gpu.py full      # the baseline under DDP
Results go to results/rmsnorm/{forward,backward}.json and results/baseline/full.json. The baseline reads the
stdlib+site corpus (reading and tokenizing it are outside the timed window), trains at most 2 epochs of it
(lmcourse.baseline.fit_to_epochs) and stores what it did: its TrainConfig, tokens, epochs, the corpus versions,
tokens/s in total and per GPU over the steady-state window, and MFU against the nominal peak it states.
"""
import sys

import lmcourse  # noqa: F401
import torch

from lmcourse.bench import save_result
from lmcourse.rmsnorm import benchmark_rmsnorm, rmsnorm, rmsnorm_ref
from lmcourse.testing import check_against_reference, random_tensors


def bench():
    # Correctness in bf16 first (the CPU interpreter cannot check bf16), then the sweep.
    for dtype in (torch.float32, torch.bfloat16):
        (x, w), seed = random_tensors([(4096, 4096), (4096,)], dtype=dtype, device="cuda")
        print(dtype, check_against_reference(rmsnorm, rmsnorm_ref, [x, w + 1, 1e-6], seed=seed))
    for mode, result in benchmark_rmsnorm().items():
        print(save_result("rmsnorm", mode, result))
        for row in result["rows"]:
            print(f"{mode:8s} {row['provider']:18s} hidden={row['hidden']:6d} {row['ms']:.4f} ms {row['tbps']:.2f} TB/s")


def full():
    from lmcourse.baseline import main
    main(["--profile", "full"])


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("bench", "all"):
        bench()
    if what in ("full", "all"):
        full()
