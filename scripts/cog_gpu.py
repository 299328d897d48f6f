"""GPU parts of the Cog Attention chapter (nbs/03_cog.ipynb), run by scripts/gpu.py (`make gpu`,
`make gpu-run CHAPTER=cog`): the benchmark (results/cog/{forward,backward}_hd{64,128}.json; `sweep`, by hand, runs
every sequence length) and, as the full run, the kernel against float64 at realistic shapes (results/cog/gpu_check.json)
and the softmax-vs-Cogformer LMs (results/cog/lm_comparison.json)."""
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


def _benchmark(budget, seq_lens, head_dims) -> list[dict]:
    "The causal sweep at `seq_lens` (16k tokens a batch), one head dim after another while 25 s remain; summary at the largest S."
    rows = []
    for D in head_dims:
        if budget.left() < 25:
            budget.skip(f"sweep at head dim {D}")
            continue
        for name, result in benchmark_cog(seq_lens=seq_lens, head_dims=(D,)).items():
            print("saved", save_result("cog", name, result))
            S = max(seq_lens)
            at = {r["provider"]: r for r in result["rows"] if r["seq_len"] == S}
            rows.append({"metric": f"{name} S={S}: cog TFLOP/s, and vs F.sdpa (softmax)",
                         "measured": f"{at['cog (triton)']['tflops']:.0f}, {at['F.sdpa']['ms'] / at['cog (triton)']['ms']:.2f}x",
                         "target": "FA2/Triton class: 0.7-1.0x of SDPA's flash (perf_anchors 2.1)"})
    return rows


def bench(budget):
    """make gpu: S = 4k and 16k at head dim 128 (the 7B-class shape), then head dim 64 if time remains. About 50 s
    (estimated): 3 kernels x 2 autotune configs x (Cog, softmax) = 12 compiles a head dim (~17 s), FlexAttention's
    compile per shape (~10-15 s each), ~20 timed points."""
    return _benchmark(budget, (4096, 16384), (128, 64))


def sweep(budget):
    "By hand: S = 1k ... 16k at head dims 64 and 128."
    return _benchmark(budget, (1024, 2048, 4096, 8192, 16384), (64, 128))


def full(budget):
    "Realistic-shape correctness in every dtype, then the LM comparison (seeds 0 and 1)."
    print("saved", save_result("cog", "gpu_check", gpu_check()))
    print("saved", save_result("cog", "lm_comparison", cog_lm_comparison(seeds=(0, 1))))
    return [{"metric": "gpu_check and lm_comparison", "measured": "results/cog/", "target": "stored"}]


PARTS = {"bench": (50, bench), "full": (480, full)}   # seconds (estimated); see results/README.md
BY_HAND = {"sweep": (240, sweep)}


if __name__ == "__main__":   # python scripts/cog_gpu.py [bench | sweep | full | all]: in this process, no time limit
    from gpu import run_cli
    run_cli({**BY_HAND, **PARTS})
