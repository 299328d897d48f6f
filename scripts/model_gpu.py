"""GPU runs of the model chapter (nbs/00a_model.ipynb): the attention paths checked against the float64 reference
on CUDA (bf16 included, which the CPU cannot check), a compiled model on packed documents, and the packed-attention
benchmark, stored under results/model/ through `lmcourse.bench.save_result`.

On the GPU machine, from the repository root:
    pip install --no-deps --no-build-isolation -e .
    python scripts/model_gpu.py                 # everything (estimated 5 minutes, most of it compiling; not yet measured)
    python scripts/model_gpu.py --only check    # one part: check | bench
"""
import argparse
import time

import lmcourse  # noqa: F401  (first, as everywhere)
import torch

from lmcourse.bench import gpu_available, save_result
from lmcourse.model import (ModelConfig, Transformer, benchmark_packed_attention, eager_attention,
                            flex_document_attention, sdpa_attention)
from lmcourse.testing import assert_close, check_against_reference, kernel_dtypes, random_tensors


def gpu_check() -> dict:
    "Every dispatch path of `sdpa_attention` and FlexAttention, forward and backward, against eager_attention in float64."
    rows = []
    shapes = [(2, 8, 8, 1000, 1000, 64), (2, 12, 4, 1024, 1024, 64), (1, 8, 2, 300, 777, 128), (2, 8, 2, 1, 513, 64)]
    for dtype in kernel_dtypes("cuda"):
        for B, H, Hkv, Tq, Tk, D in shapes:
            # The compiled FlexAttention recompiles per shape, dtype and mask; past dynamo's recompile limit it would
            # silently fall back to the unfused path, which is not what we mean to check.
            torch._dynamo.reset()
            for packed in (False, True):
                (q, k, v), seed = random_tensors([(B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)], dtype, "cuda")
                g = torch.Generator().manual_seed(seed)
                seg = (torch.rand(B, Tk, generator=g) < 1 / 200).cumsum(1).cuda() if packed else None
                for name, fn in (("sdpa_attention", sdpa_attention), ("flex_document_attention", flex_document_attention)):
                    errors = check_against_reference(lambda q, k, v, fn=fn: fn(q, k, v, segment_ids=seg),
                                                     lambda q, k, v: eager_attention(q, k, v, segment_ids=seg), [q, k, v], seed=seed)
                    rows.append({"fn": name, "dtype": str(dtype), "shape": [B, H, Hkv, Tq, Tk, D], "packed": packed,
                                 "seed": seed, **errors})
                    print(rows[-1], flush=True)
    return {"rows": rows}


def compiled_model_check() -> dict:
    "A compiled model on packed documents (FlexAttention inside its graph) against the same weights on eager_attention."
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=1024)
    model, reference = Transformer(cfg).cuda(), Transformer(cfg, attention=eager_attention).cuda()
    reference.load_state_dict(model.state_dict())
    x = torch.randint(0, 512, (4, 1024), device="cuda")
    compiled = torch.compile(model)
    errors = {}
    for step in range(2):                      # the second batch has other documents: it must not recompile
        seg = (torch.rand(4, 1024, device="cuda") < 1 / 100).cumsum(1)
        torch._dynamo.config.error_on_recompile = step > 0
        start = time.perf_counter()
        logits, loss = compiled(x, x, segment_ids=seg)
        loss.backward()
        errors[f"batch{step}_s"] = time.perf_counter() - start
        errors[f"batch{step}_rel_error"] = assert_close(logits, reference(x, segment_ids=seg)[0], 5e-3, f"compiled logits {step}")
    torch._dynamo.config.error_on_recompile = False
    return errors


def bench(budget):
    "make gpu's trimmed sweep: packed-document attention at T = 2048 only (FlexAttention compiles per shape)."
    torch._dynamo.reset()
    rows = []
    for mode, result in benchmark_packed_attention(seq_lens=(2048,)).items():
        print("saved", save_result("model", f"packed_attention_{mode}", result))
        by = {r["provider"]: r for r in result["rows"]}
        rows += [{"metric": f"packed attention {mode} T=2048: {name}", "measured": f"{r['tflops']:.0f} TFLOP/s",
                  "target": "flex >= sdpa's masked path"} for name, r in by.items()]
    return rows


def full(budget):
    "Every attention path against float64 in every dtype, the compiled model, then the full sweep."
    print("saved", save_result("model", "gpu_check", {**gpu_check(), "compiled_model": compiled_model_check()}))
    torch._dynamo.reset()
    for mode, result in benchmark_packed_attention().items():
        print("saved", save_result("model", f"packed_attention_{mode}", result))
    return [{"metric": "gpu_check and packed attention sweep", "measured": "results/model/", "target": "stored"}]


PARTS = {"bench": (30, bench), "full": (480, full)}   # seconds, for scripts/gpu.py (make gpu, make gpu-run CHAPTER=model)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["check", "bench"], default=None)
    args = parser.parse_args()
    if not gpu_available():
        raise SystemExit("scripts/model_gpu.py needs a CUDA GPU")
    parts = [args.only] if args.only else ["check", "bench"]
    if "check" in parts:
        start = time.perf_counter()
        result = {**gpu_check(), "compiled_model": compiled_model_check()}
        print("saved", save_result("model", "gpu_check", result), f"{time.perf_counter() - start:.0f} s")
    if "bench" in parts:
        torch._dynamo.reset()                  # fresh compile caches: every provider runs its compiled kernel
        start = time.perf_counter()
        for mode, result in benchmark_packed_attention().items():
            print("saved", save_result("model", f"packed_attention_{mode}", result))
            for row in result["rows"]:
                print(f"{mode:8s} T={row['seq_len']:5d} {row['provider']:36s} {row['ms']:.3f} ms {row['tflops']:.0f} TFLOP/s")
        print(f"benchmark: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
