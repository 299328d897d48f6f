"""GPU work of the Batch-ICL chapter (nbs/11_batch_icl.ipynb); results go to results/batch_icl/.

    python scripts/batch_icl_gpu.py check    # packed launch = separate passes on CUDA (FlexAttention, Cog kernel; fp32, bf16)
    python scripts/batch_icl_gpu.py bench    # make gpu's part: time and memory at N = 16, demonstrations of 256 tokens
    python scripts/batch_icl_gpu.py sweep    # time and memory vs N and demonstration length (estimated 3-4 min, not yet measured)
    python scripts/batch_icl_gpu.py full     # the full toy run, clean and noisy pretraining, 3 seeds (at most 8 min)

Each part is a function of a time budget (`.left()` seconds, `.skip(what, why)`) returning summary rows
{"metric", "measured", "target"}, `bench` and `full` in PARTS (`make gpu`, `make gpu-run CHAPTER=batch_icl`); `check` and
`sweep` in BY_HAND.
Needs only torch, triton and the package (`pip install --no-deps --no-build-isolation -e .`)."""
import time

import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET when no GPU is visible)
import torch

from lmcourse.bench import gpu_available, save_result
from lmcourse.batch_icl import (BENCH_DEMO_LENS, BENCH_SHOTS, batch_icl_logits, batch_icl_reference, benchmark_batch_icl,
                                full_experiment, random_episodes, toy_summary)


def check(budget) -> list[dict]:
    "The packed launch against the separate passes on eager attention, at a GPU size, per attention and dtype."
    from lmcourse.cog import make_attention_fn
    from lmcourse.model import ModelConfig, Transformer, eager_attention, sdpa_attention
    from lmcourse.testing import rel_error
    cfg = ModelConfig(vocab_size=4096, d_model=512, n_layers=6, n_heads=8, n_kv_heads=2, max_seq_len=16_384)
    torch.manual_seed(0)
    reference_model = Transformer(cfg, attention=eager_attention).cuda().eval()
    rows, results = [], []
    for n_shots, demo_len in ((4, 64), (16, 200)):
        ep = random_episodes(4, n_shots, demo_len, vocab_size=cfg.vocab_size, device="cuda")
        layers = [0, 3, 5, 6]
        reference = torch.stack([batch_icl_reference(reference_model, ep, k, epochs=2) for k in layers], 1)
        for name, attention in (("sdpa_attention (FlexAttention)", sdpa_attention),
                                ("Cog Triton kernel, softmax", make_attention_fn(signed=False))):
            for dtype in (torch.float32, torch.bfloat16):
                if budget.left() < 20:
                    budget.skip(f"check {name} {dtype} N={n_shots}")
                    continue
                torch._dynamo.reset()
                model = Transformer(cfg, attention=attention).cuda().eval()
                model.load_state_dict(reference_model.state_dict())
                model.to(dtype)
                err = rel_error(batch_icl_logits(model, ep, layers, epochs=2).float(), reference)
                tol = 5e-3 if dtype == torch.float32 else 3e-2     # TF32 matmuls / bf16 storage
                results.append(dict(attention=name, dtype=str(dtype), n_shots=n_shots, demo_len=demo_len, rel_error=err, tol=tol))
                rows.append(dict(metric=f"packed = separate passes, {name}, {dtype}, N={n_shots}", measured=f"{err:.2e}",
                                 target=f"<= {tol:.0e}"))
                print(results[-1], flush=True)
    print("saved", save_result("batch_icl", "gpu_check", {"rows": results}))
    bad = [r for r in results if not r["rel_error"] <= r["tol"]]
    if bad: raise AssertionError(f"packed launch differs from the separate passes: {bad}")
    return rows


def _benchmark(n_shots, demo_lens, summary_shots) -> list[dict]:
    "benchmark_batch_icl; summary at `summary_shots`: Batch-ICL (packed, FlexAttention) time and memory over N-shot's."
    start = time.perf_counter()
    result = benchmark_batch_icl(n_shots, demo_lens)
    print("saved", save_result("batch_icl", "benchmark", result), f"{time.perf_counter() - start:.0f} s")
    rows = []
    for r in result["rows"]:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    by = {(r["provider"], r["n_shots"], r["demo_len"]): r for r in result["rows"] if r.get("ms")}
    for (provider, N, D), r in by.items():
        base = by.get(("N-shot (one prompt)", N, D))
        if provider.startswith("Batch-ICL packed (Flex") and base and N in summary_shots:
            rows.append(dict(metric=f"Batch-ICL packed / N-shot time, N={N}, D={D}", measured=round(r["ms"] / base["ms"], 2),
                             target="< 1 where attention dominates (large N, long D)"))
            rows.append(dict(metric=f"Batch-ICL packed / N-shot memory, N={N}, D={D}",
                             measured=round(r["peak_mib"] / base["peak_mib"], 2), target="reported"))
    return rows


def bench(budget) -> list[dict]:
    """make gpu: N = 16 demonstrations of 256 tokens (an 8-layer d = 1024 model, bf16), where attention dominates. About
    30 s (estimated): FlexAttention's compile for the packed shape (the slowest step), the Cog forward (2 autotune
    configs), 4 providers timed once each."""
    return _benchmark((16,), (256,), summary_shots=(16,))


def sweep(budget) -> list[dict]:
    "By hand: N = 2 ... 32, demonstrations of 32 and 256 tokens."
    return _benchmark(BENCH_SHOTS, BENCH_DEMO_LENS, summary_shots=(4, 32))


def full(budget, seed=None) -> list[dict]:
    "The full run: toys pretrained on clean and on noisy demonstrations, evaluated at N = 2, 4, 8, 16 (stops in time)."
    start = time.perf_counter()
    seeds = (seed,) if seed is not None else (0, 1, 2)
    result = full_experiment(seeds=seeds, seconds_left=lambda: budget.left() - 30, seconds_per_model=70)
    for what in result["skipped"]: budget.skip(what)
    result["seconds"] = time.perf_counter() - start
    print("saved", save_result("batch_icl", "full_run", result), f"{result['seconds']:.0f} s")
    rows = []
    for run in result["runs"]:
        s = toy_summary(dict(seed=run["seed"], **run["by_n_shots"][4]))
        print(run["regime"], s, flush=True)
        rows.append(dict(metric=f"{run['regime']} seed {run['seed']}: Batch-ICL (E=1, val layer) vs N-shot mean, N=4",
                         measured=f"{s['batch_icl_E1']:.3f} vs {s['n_shot_mean']:.3f}", target="Batch-ICL higher (paper)"))
    return rows


PARTS = {"bench": (30, bench), "full": (480, full)}   # make gpu, make gpu-run CHAPTER=batch_icl (seconds, estimated)
BY_HAND = {"check": (60, check), "sweep": (240, sweep)}   # estimated seconds, not measured

if __name__ == "__main__":
    if not gpu_available():
        raise SystemExit("no CUDA device: this script only runs on a GPU machine")
    from gpu import run_cli
    run_cli({**BY_HAND, **PARTS})
