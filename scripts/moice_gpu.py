"""GPU runs of the MoICE chapter (nbs/04_moice.ipynb, lmcourse.moice); results go to results/moice/*.json.

Parts (see scripts/gpu.py and results/README.md):
    make gpu                     # `bench`: the fused decode at L = 32k and the prefill at T = 4k against their baselines
    make gpu-run CHAPTER=moice   # `full`: the kernels vs float64 in every dtype, the decode and prefill sweeps,
                                 #  then the retrieval experiment (at most 8 minutes)
    python scripts/moice_gpu.py [bench | full | all]   # the same in this process, no time limit

Expected times on one H100/H200 (not measured yet: no GPU was available):
    bench  ~25 s    (decode: split + combine kernels, 2 compiles; prefill forward and backward, 2 autotune configs each
                     with LMCOURSE_AUTOTUNE_MAX=2: ~6 compiles; 4 + 3 + 3 timed points)
    check  ~1 min   (Triton JIT: ~12 kernel specializations x 1-2 configs each; the checks themselves are seconds)
    sweeps ~2 min   (autotune 1-2 configs per prefill kernel and shape bucket; 4 + 4 sweep points x 3-4 providers)
    retrieval ~4 min (base LM 2,000 steps; 6 router-training runs of 200 steps; evaluation)
"""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")   # the retrieval experiment uses the full sizes

import lmcourse  # noqa: F401  (first, as everywhere)
import torch

from lmcourse.bench import save_result
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


def _save_benchmark(results: dict) -> list[dict]:
    "Store `benchmark_moice`'s sweeps; summary rows at their largest sizes: fused vs the released path, N SDPAs, one SDPA."
    for name, result in results.items():
        print("saved", save_result("moice", name, result))
    rows = []
    for name, baselines, target in (
            ("decode", ("released: rotate + replicate", "N × SDPA, pre-rotated cache", "1 × SDPA (one base)"),
             "faster than the released path and N SDPAs; one SDPA is the floor (same bytes)"),
            ("prefill_forward", ("N × SDPA + mix", "1 × SDPA (one base)"), "vs 1 SDPA: the honest N× cost"),
            ("prefill_forward_backward", ("N × SDPA + mix", "1 × SDPA (one base)"), "vs 1 SDPA: the honest N× cost")):
        result = results[name]
        x = max(r[result["x_name"]] for r in result["rows"])
        ms = {r["provider"]: r["ms"] for r in result["rows"] if r[result["x_name"]] == x}
        fused = next(p for p in ms if p.startswith("fused"))
        rows.append({"metric": f"{name} {result['x_name']}={x}: speed-up of {fused} over " + ", ".join(baselines),
                     "measured": ", ".join(f"{ms[b] / ms[fused]:.2f}x" for b in baselines), "target": target})
    return rows


def bench(budget):
    "make gpu: the decode at L = 32k and the prefill at T = 4k (B = 1, 32 heads of 128, N = 7 bases, bf16)."
    return _save_benchmark(benchmark_moice(decode_lengths=(32768,), prefill_lengths=(4096,)))


def full(budget):
    "make gpu-run CHAPTER=moice: the kernel check, the sweeps, then the retrieval experiment, while time remains."
    print("saved", save_result("moice", "gpu_check", gpu_check()))
    rows = []
    if budget.left() < 150:
        budget.skip("decode and prefill sweeps")
    else:
        rows += _save_benchmark(benchmark_moice())
    if budget.left() < 240:
        budget.skip("retrieval experiment")
    else:
        print("saved", save_result("moice", "retrieval", moice_retrieval_experiment()))
        rows.append({"metric": "retrieval experiment", "measured": "results/moice/retrieval.json", "target": "stored"})
    return rows


PARTS = {"bench": (25, bench), "full": (480, full)}   # seconds (estimated); see results/README.md


if __name__ == "__main__":   # python scripts/moice_gpu.py [full | all]: the parts in this process, no time limit
    from gpu import run_cli
    run_cli(PARTS)
