"""GPU runs of the Cog Attention chapter (nbs/03_cog.ipynb): kernel checks in every dtype, the benchmark sweep
and the LM comparison, stored under results/cog/ through `lmcourse.bench.save_result`.

On the GPU machine, from the repository root:
    pip install --no-deps --no-build-isolation -e .
    python scripts/cog_gpu.py                 # everything (~3 min checks + sweep, ~8 min LMs)
    python scripts/cog_gpu.py --only bench    # one part: check | bench | lm
"""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")   # the LM comparison uses the full sizes

import argparse
import time

import lmcourse  # noqa: F401  (first, as everywhere)

from lmcourse.bench import gpu_available, save_result
from lmcourse.cog import benchmark_cog, cog_attention, cog_attention_ref, cog_lm_comparison
from lmcourse.testing import check_against_reference, kernel_dtypes, random_tensors


def gpu_check() -> dict:
    "Kernel vs float64 reference on the GPU in every kernel dtype (bf16 included), with realistic shapes."
    rows = []
    shapes = [(2, 8, 8, 1000, 1000, 64, True), (1, 8, 2, 777, 2048, 128, True), (2, 4, 4, 513, 513, 96, False),
              (1, 4, 1, 1, 300, 128, True)]
    for dtype in kernel_dtypes("cuda"):
        for B, H, Hkv, Tq, Tk, D, causal in shapes:
            for signed in (True, False):
                (q, k, v), seed = random_tensors([(B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)], dtype, "cuda")
                errors = check_against_reference(lambda q, k, v: cog_attention(q, k, v, causal, None, signed),
                                                 lambda q, k, v: cog_attention_ref(q, k, v, causal, None, signed=signed),
                                                 [q, k, v], seed=seed)
                rows.append({"dtype": str(dtype), "shape": [B, H, Hkv, Tq, Tk, D], "causal": causal, "signed": signed,
                             "seed": seed, **errors})
                print(rows[-1], flush=True)
    return {"rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["check", "bench", "lm"], default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    if not gpu_available():
        raise SystemExit("scripts/cog_gpu.py needs a CUDA GPU")
    parts = [args.only] if args.only else ["check", "bench", "lm"]
    if "check" in parts:
        start = time.perf_counter()
        print("saved", save_result("cog", "gpu_check", gpu_check()), f"{time.perf_counter() - start:.0f} s")
    if "bench" in parts:
        start = time.perf_counter()
        for name, result in benchmark_cog().items():
            print("saved", save_result("cog", name, result))
        print(f"benchmark: {time.perf_counter() - start:.0f} s")
    if "lm" in parts:
        start = time.perf_counter()
        result = cog_lm_comparison(seeds=tuple(args.seeds))
        print("saved", save_result("cog", "lm_comparison", result), f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
