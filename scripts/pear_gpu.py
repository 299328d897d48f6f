"""GPU work of the PEAR chapter (nbs/07_pear.ipynb); results go to results/pear/ through `lmcourse.bench.save_result`.

On the GPU machine, from the repository root (`pip install --no-deps --no-build-isolation -e .` first):
    python scripts/pear_gpu.py test            # tests/test_pear.py and tests/test_pear_hf.py on the GPU (bf16 included)
    python scripts/pear_gpu.py check           # kernels vs float64 at GPU sizes, every dtype -> pear/gpu_check.json
    python scripts/pear_gpu.py bench           # projection, projection_memory, fold_latency, prescreen
    python scripts/pear_gpu.py full            # the RAG run, RoPE and learned positions -> pear/full_run.json
None of these has been run yet (no GPU was available): their times are not known.
"""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")   # the RAG run uses the full sizes

import argparse
import subprocess
import sys
import time

import lmcourse  # noqa: F401  (first, as everywhere)
import torch

from lmcourse.bench import gpu_available, save_result
from lmcourse.pear import (benchmark_pear, dla_prescreen, dla_prescreen_ref, head_scaled_linear, head_scaled_linear_ref,
                           pear_full_run)
from lmcourse.testing import check_against_reference, kernel_dtypes, random_tensors, rel_error, tolerance


def gpu_check() -> dict:
    "The kernels against float64 references on the GPU in every dtype (bf16 included), at Llama-like shapes."
    rows = []
    for dtype in kernel_dtypes("cuda"):
        for N, d, H, D, bias in [(4096, 4096, 32, 128, False), (1000, 1536, 12, 128, True), (777, 1000, 10, 80, False),
                                 (64, 768, 12, 64, True)]:
            (z, w, b, tau), seed = random_tensors([(N, H * D), (d, H * D), (d,), (H,)], dtype, "cuda")
            w = w / D ** 0.5
            tau = tau.float().abs() + 0.25
            tol = tolerance(dtype, "cuda")
            errors = check_against_reference(
                lambda z, tau: head_scaled_linear(z, w, tau, b if bias else None),
                lambda z, tau: head_scaled_linear_ref(z, w.double(), tau, b.double() if bias else None),
                [z, tau], grad_tol=2 * tol, seed=seed)
            rows.append({"kernel": "head_scaled_linear", "dtype": str(dtype), "shape": [N, d, H, D], "bias": bias,
                         "seed": seed, **errors})
            print(rows[-1], flush=True)
        for R, d, H, D in [(100, 4096, 32, 128), (37, 1000, 10, 80)]:
            (z, w, rho), seed = random_tensors([(R, H * D), (d, H * D), (R, d)], dtype, "cuda")
            mean_z = z.mean(0, keepdim=True)
            got = dla_prescreen(z, mean_z, rho.float(), w, H)
            want = dla_prescreen_ref(z.double(), mean_z.double(), rho.double(), w.double(), H)
            error = rel_error(got, want)
            assert error <= tolerance(dtype, "cuda"), (error, seed)
            rows.append({"kernel": "dla_prescreen", "dtype": str(dtype), "shape": [R, d, H, D], "seed": seed, "out0": error})
            print(rows[-1], flush=True)
    return {"rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=["test", "check", "bench", "full"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    if not gpu_available():
        raise SystemExit("scripts/pear_gpu.py needs a CUDA GPU")
    for part in args.parts:
        start = time.perf_counter()
        if part == "test":
            code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_pear.py",
                                    "tests/test_pear_hf.py"])
            if code: raise SystemExit(code)
        elif part == "check":
            print("saved", save_result("pear", "gpu_check", gpu_check()))
        elif part == "bench":
            for name, result in benchmark_pear().items():
                print("saved", save_result("pear", name, result))
        else:
            print("saved", save_result("pear", "full_run", pear_full_run(seeds=tuple(args.seeds))))
        print(f"{part}: {time.perf_counter() - start:.0f} s", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
