"""GPU work of the Masked Thought chapter (nbs/10_masked_thought.ipynb); results go to results/masked_thought/.

    python scripts/masked_thought_gpu.py check    # kernel vs reference at realistic shapes, fp32/fp16/bf16 -> gpu_check.json
    python scripts/masked_thought_gpu.py bench    # make gpu's part: fused vs eager vs torch.compile at 64k tokens, d = 4096
    python scripts/masked_thought_gpu.py sweep    # the same at 8k-64k tokens -> forward.json, backward.json
    python scripts/masked_thought_gpu.py full     # pretrain + 5 arms x 3 seeds, <= 8 min (estimated) -> full.json
    python scripts/masked_thought_gpu.py          # all three (the kernel tests: make gpu's `tests` part, or
                                                  # pytest -m gpu tests/test_masked_thought.py)

None of these has been run yet: no GPU was available when the chapter was written. Needs only torch, triton and the
package (`pip install --no-deps --no-build-isolation -e .`). `make gpu` runs `bench`, `make gpu-run CHAPTER=masked_thought`
runs `full` (PARTS below); the kernel tests run in make gpu's `tests` part (`@pytest.mark.gpu`); `check` and `sweep`
run by hand."""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")

import time

import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET when no GPU is visible)
import torch

from lmcourse.bench import save_result, speedups
from lmcourse.masked_thought import (benchmark_noisy_embedding, check_noisy_embedding, masked_thought_experiment_config,
                                     run_masked_thought_experiment, summarize)
from lmcourse.testing import kernel_dtypes

# (shape, V, D): a Llama-2-7B batch slice, ragged sizes, a vocabulary of 128k, a wide model, int32 ids
CHECK_CASES = [dict(shape=(8, 1024), V=32_000, D=1024), dict(shape=(3, 1001), V=50_257, D=768),
               dict(shape=(4096,), V=128_256, D=512), dict(shape=(2, 999), V=257, D=4096, ids_dtype=torch.int32)]


def check(budget):
    "Every check case in every dtype: used ids, corruption and rows bit-exact vs the reference (same Philox), dW vs float64."
    rows = []
    for dtype in kernel_dtypes("cuda"):
        for case in CHECK_CASES:
            start = time.perf_counter()
            errors = check_noisy_embedding(**case, dtype=dtype, seed=12345)
            rows.append({"dtype": str(dtype), **{k: str(v) for k, v in case.items()}, **errors,
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    print("saved", save_result("masked_thought", "gpu_check", {
        "rows": rows, "note": "the same seed gives the same corruption as the PyTorch reference, which the CPU "
                              "interpreter matches bit for bit (tests/test_masked_thought.py)"}))
    return [{"metric": f"dW rel. error {r['dtype']} {r['shape']}", "measured": r["dW"], "target": "within tolerance"} for r in rows]


def _benchmark(tokens) -> list[dict]:
    "benchmark_noisy_embedding at d = 4096, V = 32k and these token counts: forward and forward+backward, 4 providers."
    rows = []
    for name, result in benchmark_noisy_embedding(tokens).items():
        print("saved", save_result("masked_thought", name, result))
        rows += [{"metric": f"{name} vs eager", "measured": row, "target": ">= 1.0"}
                 for row in speedups(result, "eager (rand + where + embedding)")]
    return rows


def bench(budget):
    """make gpu: 64k tokens only. About 15 s (estimated): the fused gather forward and backward (2 compiles, no
    autotuning), `torch.compile` of the eager path (2 graphs, the slowest step), 8 timed points."""
    return _benchmark((65536,))


def sweep(budget):
    "By hand: 8k, 16k, 32k and 64k tokens."
    return _benchmark((8192, 16384, 32768, 65536))


def full(budget, seed: int = 0):
    "The chapter's full experiment: pretraining, then every arm at every fine-tuning seed, clean and distractor test sets."
    start = time.perf_counter()
    result = run_masked_thought_experiment(masked_thought_experiment_config(), base_seed=seed)
    result["seconds"] = time.perf_counter() - start
    print("saved", save_result("masked_thought", "full", result), f"{result['seconds']:.0f} s")
    return [{"metric": f"{row['arm']} accuracy (clean, distractors)", "measured": row, "target": "mft > sft (paper)"}
            for row in summarize(result)]


PARTS = {"bench": (15, bench), "full": (480, full)}   # make gpu, make gpu-run CHAPTER=masked_thought (seconds, estimated)
BY_HAND = {"check": (60, check), "sweep": (60, sweep)}   # estimated seconds

if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script only runs on a GPU machine")
    from gpu import run_cli
    run_cli({**BY_HAND, **PARTS})
