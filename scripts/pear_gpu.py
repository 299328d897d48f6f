"""GPU runs of the PEAR chapter (nbs/07_pear.ipynb, lmcourse.pear); results go to results/pear/*.json.

Parts (see scripts/gpu.py and results/README.md):
    make gpu-run CHAPTER=pear   # `full`, in this order while time remains (8 minutes):
                                #  1. `bench`: at T = 4096, d = 4096 (32 heads of 128), bf16: the fused projection
                                #     (fwd + bwd) vs the released einsum, column-scale + cuBLAS and the no-coefficient
                                #     floor, with peak memory; folded vs original vs attached latency; the pre-screen
                                #  2. the RAG run, RoPE and learned positions, seed 0
                                #  3. the kernels vs float64 at GPU shapes in every dtype; 4. the sweep T = 1k ... 8k
    python scripts/pear_gpu.py  # the same, in this process, no time limit
`make gpu` runs `bench` (PARTS below). The kernels' correctness tests on the GPU are the `tests` part of make gpu
(tests/test_pear.py, marked `gpu`).

Expected compile counts (nbs/07_pear.ipynb, "Compile and autotune counts"): bench, with LMCOURSE_AUTOTUNE_MAX=2,
2 forward + 2 backward + 2 pre-screen configs = 6 compiles (~10 s), 4 autotune keys; check at most 120 compiles
(every config, 3 dtypes, 4 shapes). None of these has been run yet (no GPU was available): the times are estimates.
"""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")   # the RAG run uses the full sizes

import lmcourse  # noqa: F401  (first, as everywhere)

from lmcourse.bench import save_result
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


def _save_benchmark(results: dict) -> list[dict]:
    "Store `benchmark_pear`'s sweeps; summary rows at its largest T: fused vs einsum and cuBLAS, memory, folding."
    for name, result in results.items():
        print("saved", save_result("pear", name, result))
    proj = results["projection"]["rows"]
    T = max(r["tokens"] for r in proj)
    ms = {r["provider"]: r["ms"] for r in proj if r["tokens"] == T}
    peak = {r["provider"]: r["peak_bytes"] for r in results["projection_memory"]["rows"]}
    lat = {r["provider"]: r["ms"] for r in results["fold_latency"]["rows"]}
    return [{"metric": f"projection fwd+bwd T={T}: fused vs einsum, vs column-scale + cuBLAS",
             "measured": f"{ms['einsum [T, H, d] (released)'] / ms['fused (triton)']:.2f}x, "
                         f"{ms['column-scale + cuBLAS'] / ms['fused (triton)']:.2f}x", "target": "> 1x vs einsum (issue 16)"},
            {"metric": "peak memory T=4096: einsum / fused", "measured": f"{peak['einsum [T, H, d] (released)'] / peak['fused (triton)']:.1f}x",
             "target": "the einsum's [T, H, d] (≈ 1 GB) saved"},
            {"metric": "latency folded / original", "measured": f"{lat['folded'] / lat['original']:.3f}",
             "target": "1 within noise (zero overhead)"}]


def bench(budget):
    """The sweeps at T = 4096 only (about 25 s, estimated: 6 compiles with LMCOURSE_AUTOTUNE_MAX=2, ~10 s; ~20 timed
    points at ~0.5 s each)."""
    return _save_benchmark(benchmark_pear(seq_lens=(4096,)))


def full(budget):
    "make gpu-run CHAPTER=pear: the benchmark at T = 4096, the RAG run, then the float64 check and the whole sweep."
    rows = bench(budget)
    print("saved", save_result("pear", "full_run", pear_full_run(seeds=(0,))))
    rows.append({"metric": "full_run (RoPE, learned positions)", "measured": "results/pear/full_run.json", "target": "stored"})
    if budget.left() < 150:
        budget.skip("the kernels vs float64 at GPU shapes (pear/gpu_check.json)")
    else:
        print("saved", save_result("pear", "gpu_check", gpu_check()))
    if budget.left() < 90:
        budget.skip("the benchmark sweep at T = 1k ... 8k")
        return rows
    return rows + _save_benchmark(benchmark_pear())


PARTS = {"bench": (25, bench), "full": (480, full)}   # seconds (estimated); see results/README.md and `bench`

if __name__ == "__main__":
    from gpu import run_cli
    run_cli(PARTS)
