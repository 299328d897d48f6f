"""GPU parts of the PolarQuant chapter (nbs/01_polarquant.ipynb), run by scripts/gpu.py (`make gpu`,
`make gpu-run CHAPTER=polarquant`): a bf16 check at benchmark shapes and the decode sweep
(results/polarquant/decode_B{1,8}.json); the full run measures key quantizers on the full baseline model
(results/polarquant/full_run.json)."""
import lmcourse  # noqa: F401  (first)

import torch

from lmcourse.bench import save_result
from lmcourse.model import eager_attention
from lmcourse.polarquant import (benchmark_decode, compare_polar_keys, decode_attention, full_run,
                                 polar_decode_attention, polar_decode_attention_reference, polar_quantize,
                                 polar_quantize_triton, structured_keys)
from lmcourse.testing import assert_close, tolerance


def check():
    "The kernels against their references at benchmark shapes (4k polar keys + a tail, D = 128, GQA 32/8), fp32 and bf16."
    dev = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        keys = structured_keys(4096 + 77, 128, n_heads=8, batch=2).to(dev, dtype)
        q = structured_keys(1, 128, n_heads=32, batch=2, seed=1).to(dev, dtype)
        v = torch.randn(2, 8, keys.shape[2], 128, device=dev, dtype=dtype)
        pk = polar_quantize_triton(keys[:, :, :4096], 4, 4, 128)
        compare_polar_keys(pk, polar_quantize(keys[:, :, :4096], 4, 4, 128), param_tol=1e-5 if dtype == torch.float32 else 1e-2)
        tol = tolerance(dtype, dev)
        assert_close(polar_decode_attention(q, pk, keys[:, :, 4096:], v),
                     polar_decode_attention_reference(q, pk, keys[:, :, 4096:], v.float()).to(dtype), tol=tol, name=f"polar {dtype}")
        assert_close(decode_attention(q, keys, v), eager_attention(q.float(), keys.float(), v.float()).to(dtype), tol=tol,
                     name=f"bf16 decode {dtype}")


def bench(budget):
    "The check, then the decode sweep trimmed to L = 8k, 32k, 128k for B = 1 and 8."
    check()
    rows = []
    for B, lengths in ((1, (8192, 32768, 131072)), (8, (8192, 32768, 131072))):
        if budget.left() < 25:
            budget.skip(f"decode sweep B={B}")
            continue
        result = benchmark_decode(batch_sizes=(B,), lengths=lengths)[B]
        print(save_result("polarquant", f"decode_B{B}", result))
        ms = {r["provider"]: r["ms"] for r in result["rows"] if r["L"] == lengths[-1]}
        rows += [{"metric": f"polar 4/4 decode vs {base}, B={B}, L={lengths[-1]}: speed-up",
                  "measured": round(ms[base] / ms["polar 4/4"], 2), "target": "<= 1.58 (bytes ceiling); paper 1.27 for q.K"}
                 for base in ("bf16 decode (ours)", "sdpa")]
    return rows


def full(budget):
    "Key quantizers on the full baseline model (trains it first if results/ has no checkpoint)."
    print(save_result("polarquant", "full_run", full_run()))
    return [{"metric": "key quantizers on the full baseline", "measured": "results/polarquant/full_run.json", "target": "stored"}]


PARTS = {"bench": (70, bench), "full": (480, full)}   # seconds; see results/README.md


if __name__ == "__main__":   # python scripts/polarquant_gpu.py [bench | full | all]: the parts in this process, no time limit
    from gpu import run_cli
    run_cli(PARTS)
