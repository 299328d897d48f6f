"""GPU runs of the HoPE chapter (nbs/02_hope.ipynb, lmcourse.hope); results go to results/hope/*.json.

On the GPU machine, from the repository root:
    pip install --no-deps --no-build-isolation -e .
    python scripts/hope_gpu.py check   # the kernel vs float64 in fp32 / fp16 / bf16 at GPU shapes (~20 s)
    python scripts/hope_gpu.py bench   # rotary fwd and fwd+bwd sweep vs eager / torch.compile / copy (~2 min)
    python scripts/hope_gpu.py run     # RoPE vs HoPE vs NoPE, trained at 256 tokens, evaluated at 1x/2x/4x (<= 8 min)
    python scripts/hope_gpu.py all     # check, bench, run

Expected compile counts: the Triton kernel specializes per (dtype, BLOCK_P, layout, direction, pointer dtype):
check ~12, bench 6; torch.compile in the bench: 4 graphs (2 head configurations x forward / forward+backward,
dynamic shapes). No autotuning (the launcher picks tiles by a heuristic, see lmcourse.hope.GPU_CONFIGS).
"""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")   # the extrapolation run uses the full sizes

import argparse
import sys
import time

import lmcourse  # noqa: F401  (first, as everywhere)

import torch

from lmcourse.bench import gpu_available, save_result
from lmcourse.hope import apply_hope, benchmark_hope, hope_extrapolation_run, hope_kept_pairs, hope_rotary
from lmcourse.testing import check_against_reference, kernel_dtypes, random_tensors

RUN_BUDGET_S = 420      # the extrapolation run stops starting new arms past this (it must end within 8 minutes)


def gpu_check() -> dict:
    "hope_rotary vs apply_hope in float64 on the GPU, every kernel dtype, training and decoding shapes, both layouts."
    rows = []
    shapes = [(4, 12, 12, 1024, 64), (2, 32, 8, 777, 128), (8, 8, 2, 1, 128), (1, 4, 4, 4099, 256)]
    for dtype in kernel_dtypes("cuda"):
        for B, H, Hkv, T, D in shapes:
            for layout in ("half", "interleaved"):
                for inplace in (False, True):
                    (q, k), seed = random_tensors([(B, H, T, D), (B, Hkv, T, D)], dtype, "cuda")
                    pos = torch.arange(T, device="cuda") + (5000 if T == 1 else 0)
                    kept = hope_kept_pairs(D, 10_000.0, max(T, 256))
                    fn = lambda q, k: hope_rotary(q.clone() if inplace else q, k.clone() if inplace else k, pos, kept,
                                                  layout=layout, inplace=inplace)
                    ref = lambda q, k: (apply_hope(q, pos, kept, layout=layout), apply_hope(k, pos, kept, layout=layout))
                    errors = check_against_reference(fn, ref, [q, k], seed=seed)
                    rows.append({"dtype": str(dtype), "shape": [B, H, Hkv, T, D], "kept": kept, "layout": layout,
                                 "inplace": inplace, "seed": seed, **errors})
                    print(rows[-1], flush=True)
    return {"rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["check", "bench", "run", "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    if not gpu_available():
        sys.exit("scripts/hope_gpu.py needs a CUDA GPU (CPU timings mean nothing)")
    if args.what in ("check", "bench", "all"):
        start = time.perf_counter()
        print("saved", save_result("hope", "gpu_check", gpu_check()), f"{time.perf_counter() - start:.0f} s")
    if args.what in ("bench", "all"):
        start = time.perf_counter()
        for name, result in benchmark_hope().items():
            print("saved", save_result("hope", name, result))
        print(f"benchmark: {time.perf_counter() - start:.0f} s")
    if args.what in ("run", "all"):
        start = time.perf_counter()
        result = hope_extrapolation_run(seeds=tuple(args.seeds), time_budget_s=RUN_BUDGET_S)
        print("saved", save_result("hope", "extrapolation", result), f"{time.perf_counter() - start:.0f} s;",
              "skipped:", result["skipped"] or "nothing")


if __name__ == "__main__":
    main()
