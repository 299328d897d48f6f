"""GPU work of the fused-loss chapter (nbs/00h_losses.ipynb); results go to results/losses/.

    python scripts/losses_gpu.py test      # tests/test_losses.py on the GPU (bf16 included), ~1 min
    python scripts/losses_gpu.py check     # kernel vs float64 at realistic shapes in bf16/fp16/fp32 -> gpu_check.json, ~1 min
    python scripts/losses_gpu.py bench     # V = 32k and 128k, T = 8192, H = 4096 -> fused_ce.json, ~2 min
    python scripts/losses_gpu.py all

Needs only torch, triton and the package (`pip install --no-deps --no-build-isolation -e .`); Liger-Kernel is a
baseline where it is installed."""
import argparse
import subprocess
import sys
import time

import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET when no GPU is visible)
import torch

from lmcourse.bench import save_result
from lmcourse.losses import benchmark_fused_ce, benchmark_summary, check_fused_ce
from lmcourse.testing import kernel_dtypes

CHECK_SHAPES = [dict(T=4096, V=32_000, H=1024), dict(T=3001, V=50_257, H=768, chunk_rows=1024),
                dict(T=2048, V=128_256, H=512, reduction="none"), dict(T=1000, V=4099, H=200, logit_scale=60.0)]


def gpu_check() -> dict:
    rows = []
    for dtype in kernel_dtypes("cuda"):
        for shape in CHECK_SHAPES:
            errors = check_fused_ce(**shape, dtype=dtype)
            rows.append({"dtype": str(dtype), **shape, **errors})
            print(rows[-1], flush=True)
    return {"rows": rows}


def bench(budget):
    "make gpu's trimmed sweep: the fused loss at V = 128k (T = 8192, H = 4096) against eager (and Liger)."
    result = benchmark_fused_ce(vocab_sizes=(128_256,))
    print("saved", save_result("losses", "fused_ce", result))
    return [{"metric": f"fused CE V={r.get('vocab')}", "measured": {k: v for k, v in r.items() if k != "vocab"},
             "target": "time <= 1.1x eager, memory >= 4x less (chapter targets)"} for r in benchmark_summary(result)]


def full(budget):
    "The kernel against float64 at realistic shapes in every dtype, then the sweep at V = 32k and 128k."
    print("saved", save_result("losses", "gpu_check", gpu_check()))
    result = benchmark_fused_ce()
    print("saved", save_result("losses", "fused_ce", result))
    return [{"metric": f"fused CE V={r.get('vocab')}", "measured": {k: v for k, v in r.items() if k != "vocab"},
             "target": "time <= 1.1x eager, memory >= 4x less (chapter targets)"} for r in benchmark_summary(result)]


PARTS = {"bench": (25, bench), "full": (480, full)}   # seconds, for scripts/gpu.py (make gpu, make gpu-run CHAPTER=losses)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["test", "check", "bench", "all"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script only runs on a GPU machine")
    parts = ["test", "check", "bench"] if args.what == "all" else [args.what]
    failed = False
    for part in parts:
        start = time.perf_counter()
        if part == "test":
            failed |= subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_losses.py"]) != 0
        elif part == "check":
            print("saved", save_result("losses", "gpu_check", gpu_check()))
        else:
            result = benchmark_fused_ce()
            print("saved", save_result("losses", "fused_ce", result))
            for row in result["rows"]: print(row)
            for row in benchmark_summary(result): print(row)
        print(f"{part}: {time.perf_counter() - start:.0f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
