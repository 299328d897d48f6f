"""GPU runs of the MoICE chapter (nbs/04_moice.ipynb): kernel checks against float64 in every dtype, the decode and
prefill benchmarks and the retrieval experiment, stored under results/moice/ through `lmcourse.bench.save_result`.

On the GPU machine, from the repository root:
    pip install --no-deps --no-build-isolation -e .
    python scripts/moice_gpu.py                  # everything
    python scripts/moice_gpu.py --only check     # one part: check | bench | full

Expected times on one H100/H200 (not measured yet: no GPU was available when this was written):
    check  ~1 min   (Triton JIT: ~12 kernel specializations × 2-3 configs each; the checks themselves are seconds)
    bench  ~2 min   (autotune 2-3 configs per prefill kernel and shape bucket; 4 + 4 sweep points × 3-4 providers)
    full   ~4 min   (base LM 2,000 steps; 6 router-training runs of 200 steps; evaluation) — at most 8 minutes
"""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")   # the retrieval experiment uses the full sizes

import argparse
import time

import lmcourse  # noqa: F401  (first, as everywhere)
import torch

from lmcourse.bench import gpu_available, save_result
from lmcourse.moice import (PAPER_BASES, benchmark_moice, moice_attention, moice_attention_ref,
                            moice_decode_attention, moice_frequencies, moice_retrieval_experiment)
from lmcourse.testing import assert_close, check_against_reference, kernel_dtypes, random_tensors, tolerance

PREFILL_SHAPES = [(2, 8, 8, 1000, 1000, 64), (1, 8, 2, 777, 2048, 128), (1, 4, 4, 513, 513, 96), (1, 4, 1, 1, 300, 128)]
DECODE_SHAPES = [(1, 32, 32, 4096, 128), (4, 32, 8, 3000, 128), (2, 8, 8, 777, 64)]


def gpu_check() -> dict:
    "Kernels vs the float64 reference on the GPU, every kernel dtype (bf16 included), N = 7, realistic shapes."
    rows = []
    for dtype in kernel_dtypes("cuda"):
        freqs = {D: moice_frequencies(PAPER_BASES, D, "cuda") for D in (64, 96, 128)}
        for B, H, Hkv, Tq, Tk, D in PREFILL_SHAPES:
            (q, k, v, z), seed = random_tensors([(B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, 7)], dtype, "cuda")
            errors = check_against_reference(                 # the float64 reference runs on the CPU (exact SDPA)
                lambda q, k, v, z: moice_attention(q, k, v, torch.softmax(z.float(), -1), freqs[D]),
                lambda q, k, v, z: moice_attention_ref(q.cpu(), k.cpu(), v.cpu(), torch.softmax(z.cpu(), -1),
                                                       freqs[D].cpu()).cuda(), [q, k, v, z], seed=seed)
            rows.append({"kernel": "prefill", "dtype": str(dtype), "shape": [B, H, Hkv, Tq, Tk, D], "seed": seed, **errors})
            print(rows[-1], flush=True)
        for B, H, Hkv, L, D in DECODE_SHAPES:
            (q, k, v, z), seed = random_tensors([(B, H, 1, D), (B, Hkv, L, D), (B, Hkv, L, D), (B, H, 1, 7)], dtype, "cuda")
            gates = torch.softmax(z.float(), -1)
            out = moice_decode_attention(q, k, v, gates, freqs[D])
            ref = moice_attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), gates.double().cpu(), freqs[D].cpu())
            err = assert_close(out, ref, tolerance(dtype, "cuda"), seed=seed)
            rows.append({"kernel": "decode", "dtype": str(dtype), "shape": [B, H, Hkv, L, D], "seed": seed, "out0": err})
            print(rows[-1], flush=True)
    return {"rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["check", "bench", "full"], default=None)
    args = parser.parse_args()
    if not gpu_available():
        raise SystemExit("scripts/moice_gpu.py needs a CUDA GPU")
    parts = [args.only] if args.only else ["check", "bench", "full"]
    for part in parts:
        start = time.perf_counter()
        try:
            if part == "check":
                print("saved", save_result("moice", "gpu_check", gpu_check()))
            elif part == "bench":
                for name, result in benchmark_moice().items():
                    print("saved", save_result("moice", name, result))
            else:
                print("saved", save_result("moice", "retrieval", moice_retrieval_experiment()))
        except Exception as e:                      # one failing part does not stop the others
            print(f"{part} FAILED: {type(e).__name__}: {e}", flush=True)
        print(f"{part}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
