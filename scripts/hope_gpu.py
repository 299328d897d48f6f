"""GPU runs of the HoPE chapter (nbs/02_hope.ipynb, lmcourse.hope); results go to results/hope/*.json.

Parts (see scripts/gpu.py and results/README.md):
    make gpu                    # `bench`: the rotary fwd and fwd+bwd at T = 8192, 32 heads of 128 (20 s)
    make gpu-run CHAPTER=hope   # `full`: the kernel vs float64 at GPU shapes, the full sweep, then RoPE vs HoPE
                                #  vs NoPE trained at 256 tokens, evaluated at 1x/2x/4x, in the time left (8 min)
    python scripts/hope_gpu.py [bench | sweep | full | all]   # the same parts in this process, no time limit
                                                              # (`sweep`: T = 1024 and 8192, both head configurations)

Expected compile counts: the Triton kernel specializes per (dtype, BLOCK_P, layout, direction, pointer dtype):
check ~12, bench 3; torch.compile in the bench: 2 graphs (forward / forward+backward, dynamic shapes), 4 in the
sweep (2 head configurations). No autotuning (the launcher picks tiles by a heuristic, see lmcourse.hope.GPU_CONFIGS).
"""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")   # the extrapolation run uses the full sizes

import lmcourse  # noqa: F401  (first, as everywhere)

import torch

from lmcourse.bench import save_result
from lmcourse.hope import apply_hope, benchmark_hope, hope_extrapolation_run, hope_kept_pairs, hope_rotary
from lmcourse.testing import check_against_reference, kernel_dtypes, random_tensors

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


def _sweep(budget, seq_lens, head_shapes) -> list[dict]:
    "The rotary sweep, one (heads, head dim) configuration at a time while time remains; a summary row per configuration."
    rows = []
    for H, D in head_shapes:
        if budget.left() < 15:
            budget.skip(f"rotary sweep at H={H}, D={D}")
            continue
        for name, result in benchmark_hope(seq_lens=seq_lens, shapes=((H, D),)).items():
            print("saved", save_result("hope", name, result))
            if name.startswith("fwd_bwd"):
                at = {r["provider"]: r for r in result["rows"] if r["seq_len"] == max(seq_lens)}
                rows.append({"metric": f"{name} T={max(seq_lens)}: triton vs eager, vs compile",
                             "measured": f"{at['eager']['ms'] / at['triton']['ms']:.2f}x, {at['compile']['ms'] / at['triton']['ms']:.2f}x",
                             "target": ">= 85% of copy bandwidth (issue 13)"})
    return rows


def bench(budget):
    "make gpu: the rotary sweep at T = 8192 (B = 16, bf16), 32 heads of 128, then 12 heads of 64 if time allows."
    return _sweep(budget, (8192,), ((32, 128), (12, 64)))


def sweep(budget):
    "By hand: T = 1024 and 8192, both head configurations."
    return _sweep(budget, (1024, 8192), ((12, 64), (32, 128)))


def full(budget):
    "make gpu-run CHAPTER=hope: the kernel check, the full sweep, then the extrapolation run in the time left."
    print("saved", save_result("hope", "gpu_check", gpu_check()))
    rows = _sweep(budget, (1024, 2048, 4096, 8192), ((12, 64), (32, 128)))
    result = hope_extrapolation_run(seeds=(0, 1), time_budget_s=max(0.0, budget.left() - 30))
    print("saved", save_result("hope", "extrapolation", result), "skipped:", result["skipped"] or "nothing")
    for what in result["skipped"]:
        budget.skip(what, "extrapolation run out of time")
    return rows + [{"metric": "gpu_check, extrapolation", "measured": "results/hope/", "target": "stored"}]


PARTS = {"bench": (20, bench), "full": (480, full)}   # seconds (estimated); see results/README.md
BY_HAND = {"sweep": (60, sweep)}


if __name__ == "__main__":   # python scripts/hope_gpu.py [bench | sweep | full | all]: in this process, no time limit
    from gpu import run_cli
    run_cli({**BY_HAND, **PARTS})
