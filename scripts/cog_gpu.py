"""GPU parts of the Cog Attention chapter (nbs/03_cog.ipynb), run by scripts/gpu.py (`make gpu`,
`make gpu-run CHAPTER=cog`): the benchmark sweep (results/cog/{forward,backward}_hd{64,128}.json) and, as the full
run, the kernel against float64 at realistic shapes (results/cog/gpu_check.json) and the softmax-vs-Cogformer LMs
(results/cog/lm_comparison.json)."""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")   # the LM comparison uses the full sizes

import lmcourse  # noqa: F401  (first, as everywhere)

import torch

from lmcourse.bench import save_result
from lmcourse.cog import benchmark_cog, cog_attention, cog_attention_ref, cog_lm_comparison
from lmcourse.testing import check_against_reference, kernel_dtypes, random_tensors


def gpu_check() -> dict:
    """Kernel vs float64 reference on the GPU in every kernel dtype (bf16 included), with realistic shapes; the last
    two pack documents as the LM run does (`segment_ids`: 1-7 documents of random lengths per sequence)."""
    rows = []
    shapes = [(2, 8, 8, 1000, 1000, 64, True, False), (1, 8, 2, 777, 2048, 128, True, False),
              (2, 4, 4, 513, 513, 96, False, False), (1, 4, 1, 1, 300, 128, True, False),
              (2, 8, 2, 1500, 1500, 128, True, True), (2, 4, 4, 400, 1100, 64, False, True)]
    for dtype in kernel_dtypes("cuda"):
        for B, H, Hkv, Tq, Tk, D, causal, segments in shapes:
            for signed in (True, False):
                (q, k, v), seed = random_tensors([(B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)], dtype, "cuda")
                seg = packed_segments(B, Tk, seed) if segments else None
                errors = check_against_reference(
                    lambda q, k, v: cog_attention(q, k, v, causal, None, signed, segment_ids=seg),
                    lambda q, k, v: cog_attention_ref(q, k, v, causal, None, signed=signed, segment_ids=seg),
                    [q, k, v], seed=seed)
                rows.append({"dtype": str(dtype), "shape": [B, H, Hkv, Tq, Tk, D], "causal": causal, "signed": signed,
                             "segments": segments, "seed": seed, **errors})
                print(rows[-1], flush=True)
    return {"rows": rows}


def packed_segments(B: int, T: int, seed: int) -> torch.Tensor:
    "Segment ids [B, T] on the GPU: each row cut into 1-7 documents at random positions (sorted ids)."
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        cuts = torch.randint(1, T, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g)
        seg[b, cuts] = 1
    return seg.cumsum(-1).cuda()


def bench(budget):
    "The causal sweep at S = 1k, 4k, 16k tokens per sequence (16k tokens a batch), head dims 64 then 128."
    rows = []
    for D in (64, 128):
        if budget.left() < 40:
            budget.skip(f"sweep at head dim {D}")
            continue
        for name, result in benchmark_cog(seq_lens=(1024, 4096, 16384), head_dims=(D,)).items():
            print("saved", save_result("cog", name, result))
            at = {r["provider"]: r for r in result["rows"] if r["seq_len"] == 16384}
            rows.append({"metric": f"{name} S=16k: cog TFLOP/s, and vs F.sdpa (softmax)",
                         "measured": f"{at['cog (triton)']['tflops']:.0f}, {at['F.sdpa']['ms'] / at['cog (triton)']['ms']:.2f}x",
                         "target": "FA2/Triton class: 0.7-1.0x of SDPA's flash (perf_anchors 2.1)"})
    return rows


def full(budget):
    "Realistic-shape correctness in every dtype, then the LM comparison (seeds 0 and 1)."
    print("saved", save_result("cog", "gpu_check", gpu_check()))
    print("saved", save_result("cog", "lm_comparison", cog_lm_comparison(seeds=(0, 1))))
    return [{"metric": "gpu_check and lm_comparison", "measured": "results/cog/", "target": "stored"}]


PARTS = {"bench": (95, bench), "full": (480, full)}   # seconds; see results/README.md


if __name__ == "__main__":   # python scripts/cog_gpu.py [bench | full | all]: the parts in this process, no time limit
    from gpu import run_cli
    run_cli(PARTS)
