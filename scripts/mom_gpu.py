"""GPU work of the Mixture-of-Modules chapter (nbs/06_mom.ipynb); results go to results/mom/.

    python scripts/mom_gpu.py bench    # make gpu's part: routed linear, one MoM round and the GRU router step vs the
                                       # per-module loop and dense, d = 1024, 16k tokens, M = 4, SKIP 0 and 50 %
    python scripts/mom_gpu.py sweep    # the same at SKIP 0 / 25 / 50 % -> benchmark.json (estimated 1-2 min)
    python scripts/mom_gpu.py full     # vanilla-8 continued vs MoM from it vs vanilla-12 on k-hop pointer chasing,
                                       # seeds 0, 1 (as the budget allows), <= 8 min (estimated) -> full.json

None of these has been run yet: no GPU was available when the chapter was written. Needs only torch, triton and the
package (`pip install --no-deps --no-build-isolation -e .`). `make gpu` runs `bench`, `make gpu-run CHAPTER=mom` runs
`full` (PARTS below); the kernel tests run in make gpu's `tests` part; `sweep` runs by hand.

Compiles (no autotuning: fixed blocks, 64 x 128 x 64 with 8 warps for the routed linear, 64 x 32 x 32 for the GRU router):
in bf16 the routed linear launches 5 distinct kernels (QKV forward with the norm, O forward with the weight, the dX
GEMM, two weight-gradient GEMMs), the GRU router 1; the loop and dense providers use cuBLAS and SDPA."""
import time

import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET when no GPU is visible)
import torch

from lmcourse.bench import save_result
from lmcourse.mom import BENCH, FULL, benchmark_summary, depth_experiment, mom_benchmark


def _benchmark(skip_rates) -> list[dict]:
    "The routed linear, a MoM round and the GRU router step, forward and forward+backward, at these SKIP rates."
    result = mom_benchmark(dict(BENCH, skip_rates=skip_rates))
    print("saved", save_result("mom", "benchmark", result))
    return [{"metric": f"{r['what']} {r['mode']} skip {r['skip_rate']}: {r['provider']} vs loop, dense/it",
             "measured": f"{r['vs_loop']}x, {r['dense_ms_over_ms']}", "target": "triton >= loop (perf_anchors ch 6)"}
            for r in benchmark_summary(result) if "triton" in r["provider"]]


def bench(budget):
    """make gpu: SKIP 0 and 50 %. About 25 s (estimated): the 6 kernels above compiled once (fixed blocks), 36 timed
    points, the loop providers the slowest."""
    return _benchmark((0.0, 0.5))


def sweep(budget):
    "By hand: SKIP 0, 25 and 50 %."
    return _benchmark(BENCH["skip_rates"])


def full(budget, seed: int | None = None):
    "The depth comparison, one seed after another while the budget allows (each seed's time is recorded)."
    runs, seeds = [], [seed] if seed is not None else [0, 1]
    for s in seeds:
        if runs and budget.left() < 1.2 * runs[-1]["seconds"]:
            budget.skip(f"seed {s}", f"{budget.left():.0f} s left, a seed took {runs[-1]['seconds']:.0f} s")
            break
        start = time.perf_counter()
        runs.append(depth_experiment(FULL, seed=s, device="cuda"))
        runs[-1]["seconds"] = time.perf_counter() - start
        print(f"seed {s}: {runs[-1]['seconds']:.0f} s", flush=True)
    print("saved", save_result("mom", "full", {"runs": runs}))
    return [{"metric": f"{name} held-out loss, seed {r['seed']}", "measured": round(arm["loss"], 4),
             "target": "MoM < vanilla-8 continued (paper: more depth, same parameters)"}
            for r in runs for name, arm in r["arms"].items()]


PARTS = {"bench": (25, bench), "full": (480, full)}   # make gpu, make gpu-run CHAPTER=mom (seconds, estimated)
BY_HAND = {"sweep": (60, sweep)}   # estimated seconds

if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script only runs on a GPU machine")
    from gpu import run_cli
    run_cli({**BY_HAND, **PARTS})
