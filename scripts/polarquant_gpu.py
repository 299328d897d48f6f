"""GPU parts of the PolarQuant chapter (nbs/01_polarquant.ipynb), run by scripts/gpu.py (`make gpu`,
`make gpu-run CHAPTER=polarquant`): a bf16 check at benchmark shapes, the paper's q.K comparison
(results/polarquant/qk_B1.json) and the decode sweep (results/polarquant/decode_B{1,8}.json); the full run
measures key quantizers on the full baseline model by the paper's protocol (results/polarquant/full_run.json)."""
import lmcourse  # noqa: F401  (first)

import torch

from lmcourse.bench import save_result
from lmcourse.model import eager_attention
from lmcourse.polarquant import (benchmark_decode, benchmark_hf_decode, benchmark_qk, compare_polar_keys, decode_attention, full_run,
                                 polar_decode_attention, polar_decode_attention_reference, polar_logits, polar_qk_logits,
                                 polar_quantize, polar_quantize_triton, structured_keys)
from lmcourse.testing import assert_close, tolerance


def check():
    """The kernels against float64 references at benchmark shapes (4k polar keys + a tail, D = 128, GQA 32/8), fp32 and
    bf16, for structured queries (large logits, concentrated softmax) and standard-normal ones (spread softmax)."""
    dev = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        keys = structured_keys(4096 + 77, 128, n_heads=8, batch=2).to(dev, dtype)
        v = torch.randn(2, 8, keys.shape[2], 128, device=dev, dtype=dtype)
        pk = polar_quantize_triton(keys[:, :, :4096], 4, 4, 128)
        compare_polar_keys(pk, polar_quantize(keys[:, :, :4096], 4, 4, 128), param_tol=1e-5 if dtype == torch.float32 else 1e-2)
        tol = tolerance(dtype, dev)        # fp32: the score dot is tf32x3, the P·V dot TF32
        queries = {"structured": structured_keys(1, 128, n_heads=32, batch=2, seed=1).to(dev, dtype),
                   "random": torch.randn(2, 32, 1, 128, device=dev, dtype=dtype)}
        for kind, q in queries.items():
            tail = keys[:, :, 4096:]
            assert_close(polar_decode_attention(q, pk, tail, v),
                         polar_decode_attention_reference(q.double(), pk, tail.double(), v.double()),
                         tol=tol, name=f"polar decode {dtype} {kind}")
            assert_close(polar_qk_logits(q, pk), polar_logits(q.double(), pk), tol=tolerance(torch.float32, dev, input_precision="ieee"),
                         name=f"polar q.K logits {dtype} {kind}")
            assert_close(decode_attention(q, keys, v), eager_attention(q.double(), keys.double(), v.double()), tol=tol,
                         name=f"bf16 decode {dtype} {kind}")


def _benchmark(budget, qk_lengths, decode_lengths) -> list[dict]:
    "The check, the paper's q.K comparison at `qk_lengths` (B = 1), then the decode at `decode_lengths` = {B: lengths}."
    check()
    rows = []
    if budget.left() < 15:
        budget.skip("q.K lookup-table benchmark")
    else:
        result = benchmark_qk(lengths=qk_lengths)
        print(save_result("polarquant", "qk_B1", result))
        ms = {r["provider"]: r["ms"] for r in result["rows"] if r["L"] == 131072}
        rows.append({"metric": "polar q.K 4/4 (lookup tables) vs bf16 q.K^T (cuBLAS), B=1, L=128k: speed-up",
                     "measured": round(ms["bf16 q.K^T (cuBLAS)"] / ms["polar q.K 4/4"], 2), "target": "paper 1.27"})
    for B, lengths in decode_lengths.items():
        if budget.left() < 15:
            budget.skip(f"decode sweep B={B}")
            continue
        result = benchmark_decode(batch_sizes=(B,), lengths=lengths)[B]
        print(save_result("polarquant", f"decode_B{B}", result))
        ms = {r["provider"]: r["ms"] for r in result["rows"] if r["L"] == lengths[-1]}
        rows += [{"metric": f"polar 4/4 decode vs {base}, B={B}, L={lengths[-1]}: speed-up",
                  "measured": round(ms[base] / ms["polar 4/4"], 2), "target": "<= 1.58 (bytes ceiling); paper 1.27 for q.K"}
                 for base in ("bf16 decode (ours)", "sdpa")]
    return rows


def bench(budget):
    """make gpu: the check, q.K at L = 128k, the decode at L = 32k and 128k for B = 1 and at 128k for B = 8. About 40 s
    (estimated): ~16 compiles (split sizes are runtime arguments; the polar decode autotunes 2 configs per bit width),
    ~20 timed points, building the 128k-token polar keys."""
    return _benchmark(budget, (131072,), {1: (32768, 131072), 8: (131072,)})


def sweep(budget):
    "By hand: q.K at 32k and 128k, the decode at 8k, 32k and 128k for B = 1 and 8."
    return _benchmark(budget, (32768, 131072), {1: (8192, 32768, 131072), 8: (8192, 32768, 131072)})


def full(budget):
    "Key quantizers on the full baseline model (trains it first if results/ has no checkpoint)."
    print(save_result("polarquant", "full_run", full_run()))
    return [{"metric": "key quantizers on the full baseline", "measured": "results/polarquant/full_run.json", "target": "stored"}]


def hf(budget):
    "End-to-end Hugging Face decode, DynamicCache vs PolarQuantCache unfused and fused (16k-token prompt, 64 new tokens)."
    result = benchmark_hf_decode()
    print(save_result("polarquant", "hf_decode", result))
    tps = {r["provider"]: r["decode_tokens_per_s"] for r in result["rows"]}
    return [{"metric": "HF decode tokens/s, fused PolarQuantCache vs DynamicCache (16k prompt, B=1)",
             "measured": round(tps["PolarQuantCache 4/4, fused"] / tps["DynamicCache + sdpa"], 2), "target": "> 1"}]


PARTS = {"bench": (40, bench), "full": (480, full)}   # seconds (estimated); see results/README.md
BY_HAND = {"sweep": (90, sweep), "hf": (120, hf)}   # outside make gpu's budget (estimated seconds, not measured)


if __name__ == "__main__":   # python scripts/polarquant_gpu.py [bench | sweep | full | hf | all]: in this process, no time limit
    from gpu import run_cli
    run_cli({**PARTS, **BY_HAND})
