"""GPU runs of the PolarQuant chapter (lmcourse.polarquant); results go to results/polarquant/*.json.

    python scripts/polarquant_gpu.py bench   # decode-attention sweep, B in {1, 8}, L 4k..128k (~3 min on one H100)
    python scripts/polarquant_gpu.py full    # quality of key quantizers on the full baseline model (~8 min once trained)
    python scripts/polarquant_gpu.py check   # the kernels against their references in bf16 on the GPU (seconds)

Install first on the GPU machine: pip install --no-deps --no-build-isolation -e .
"""
import lmcourse  # noqa: F401  (first)

import argparse
import os
import sys

import torch

from lmcourse.bench import gpu_available, save_result
from lmcourse.model import eager_attention
from lmcourse.polarquant import (benchmark_decode, compare_polar_keys, decode_attention, full_run,
                                 polar_decode_attention, polar_decode_attention_reference, polar_quantize,
                                 polar_quantize_triton, structured_keys)
from lmcourse.testing import assert_close


def check():
    "bf16 correctness at benchmark shapes before timing anything."
    dev = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        keys = structured_keys(4096 + 77, 128, n_heads=8, batch=2).to(dev, dtype)
        q = structured_keys(1, 128, n_heads=32, batch=2, seed=1).to(dev, dtype)
        v = torch.randn(2, 8, keys.shape[2], 128, device=dev, dtype=dtype)
        pk = polar_quantize_triton(keys[:, :, :4096], 4, 4, 128)
        compare_polar_keys(pk, polar_quantize(keys[:, :, :4096], 4, 4, 128), param_tol=1e-5 if dtype == torch.float32 else 1e-2)
        tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
        assert_close(polar_decode_attention(q, pk, keys[:, :, 4096:], v),
                     polar_decode_attention_reference(q, pk, keys[:, :, 4096:], v.float()).to(dtype), tol=tol, name=f"polar {dtype}")
        assert_close(decode_attention(q, keys, v), eager_attention(q.float(), keys.float(), v.float()).to(dtype), tol=tol,
                     name=f"bf16 decode {dtype}")
    print("kernels match their references on", torch.cuda.get_device_name())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["check", "bench", "full", "all"])
    args = parser.parse_args(argv)
    if not gpu_available():
        sys.exit("no CUDA GPU visible: these runs are GPU-only (CPU timings mean nothing)")
    os.environ.setdefault("LMCOURSE_PROFILE", "full")
    if args.what in ("check", "bench", "all"):
        check()
    if args.what in ("bench", "all"):
        for B, result in benchmark_decode().items():
            print(save_result("polarquant", f"decode_B{B}", result))
    if args.what in ("full", "all"):
        print(save_result("polarquant", "full_run", full_run()))


if __name__ == "__main__":
    main()
