"""GPU work of the Masked Thought chapter (nbs/10_masked_thought.ipynb); results go to results/masked_thought/.

    python scripts/masked_thought_gpu.py test     # tests/test_masked_thought.py on the GPU (bf16 included), ~1 min (estimated)
    python scripts/masked_thought_gpu.py check    # kernel vs reference at realistic shapes, fp32/fp16/bf16 -> gpu_check.json
    python scripts/masked_thought_gpu.py bench    # fused vs eager vs torch.compile, 8k-64k tokens, d = 4096 -> forward.json, backward.json
    python scripts/masked_thought_gpu.py full     # pretrain + 5 arms x 3 seeds, <= 8 min (estimated) -> full.json
    python scripts/masked_thought_gpu.py full --arms sft "mft 0.4" --seeds 0   # a cheaper subset
    python scripts/masked_thought_gpu.py all      # test, check, bench (not full)

None of these has been run yet: no GPU was available when the chapter was written. Needs only torch, triton and the
package (`pip install --no-deps --no-build-isolation -e .`). `make gpu-run CHAPTER=masked_thought` runs `full` (PARTS
below); the kernel tests run in make gpu's `tests` part (`@pytest.mark.gpu`); `check` and `bench` have no make gpu
budget yet (its 540 s are spent) and run by hand."""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")

import argparse
import dataclasses
import subprocess
import sys
import time

import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET when no GPU is visible)
import torch

from lmcourse.bench import save_result, speedups
from lmcourse.masked_thought import (ARMS, benchmark_noisy_embedding, check_noisy_embedding, masked_thought_experiment_config,
                                     run_masked_thought_experiment, summarize)
from lmcourse.testing import kernel_dtypes

# (shape, V, D): a Llama-2-7B batch slice, ragged sizes, a vocabulary of 128k, a wide model, int32 ids
CHECK_CASES = [dict(shape=(8, 1024), V=32_000, D=1024), dict(shape=(3, 1001), V=50_257, D=768),
               dict(shape=(4096,), V=128_256, D=512), dict(shape=(2, 999), V=257, D=4096, ids_dtype=torch.int32)]


def gpu_check() -> dict:
    "Every check case in every dtype: used ids, corruption and rows bit-exact vs the reference (same Philox), dW vs float64."
    rows = []
    for dtype in kernel_dtypes("cuda"):
        for case in CHECK_CASES:
            start = time.perf_counter()
            errors = check_noisy_embedding(**case, dtype=dtype, seed=12345)
            rows.append({"dtype": str(dtype), **{k: str(v) for k, v in case.items()}, **errors,
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    return {"rows": rows, "note": "the same seed gives the same corruption as the PyTorch reference, which the CPU "
                                  "interpreter matches bit for bit (tests/test_masked_thought.py)"}


def full(budget, seed: int = 0):
    "The chapter's full experiment: pretraining, then every arm at every fine-tuning seed, clean and distractor test sets."
    start = time.perf_counter()
    result = run_masked_thought_experiment(masked_thought_experiment_config(), base_seed=seed)
    result["seconds"] = time.perf_counter() - start
    print("saved", save_result("masked_thought", "full", result), f"{result['seconds']:.0f} s")
    return [{"metric": f"{row['arm']} accuracy (clean, distractors)", "measured": row, "target": "mft > sft (paper)"}
            for row in summarize(result)]


PARTS = {"full": (480, full)}   # make gpu-run CHAPTER=masked_thought


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["test", "check", "bench", "full", "all"])
    ap.add_argument("--seed", type=int, default=0, help="the base seed of the full run (pretraining, data)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="fine-tuning seeds of the full run")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script only runs on a GPU machine")
    parts = ["test", "check", "bench"] if args.what == "all" else [args.what]
    failed = False
    for part in parts:
        start = time.perf_counter()
        if part == "test":
            failed |= subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       "tests/test_masked_thought.py"]) != 0
        elif part == "check":
            print("saved", save_result("masked_thought", "gpu_check", gpu_check()))
        elif part == "bench":
            for name, result in benchmark_noisy_embedding().items():
                print("saved", save_result("masked_thought", name, result))
                for row in speedups(result, "eager (rand + where + embedding)"):
                    print(name, row)
        else:
            cfg = masked_thought_experiment_config()
            if args.arms: cfg = dataclasses.replace(cfg, arms=tuple(args.arms))
            if args.seeds: cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
            result = run_masked_thought_experiment(cfg, base_seed=args.seed)
            result["seconds"] = time.perf_counter() - start
            print("saved", save_result("masked_thought", "full", result), f"{result['seconds']:.0f} s")
            for row in summarize(result):
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        print(f"{part}: {time.perf_counter() - start:.0f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
