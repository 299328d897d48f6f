"""GPU work of the copying chapter (nbs/12_copying.ipynb); results go to results/copying/.

    python scripts/copying_gpu.py bench    # make gpu's part: statistics kernel vs plain forward vs eager probabilities, T = 2k, 8k
    python scripts/copying_gpu.py sweep    # the same at T = 1k, 2k, 4k, 8k (by hand; estimated 1-2 min, not yet measured)
    python scripts/copying_gpu.py full     # 6-layer runs: batch 64 and 32 (steps vs tokens), weight decay 0 / 0.1 / 0.3 (at most 8 min)

Each part is a function of a time budget (`.left()` seconds, `.skip(what, why)`) returning summary rows
{"metric", "measured", "target"}; `bench` and `full` in PARTS (`make gpu`, `make gpu-run CHAPTER=copying`), `sweep` in
BY_HAND. Needs only torch, triton and the package (`pip install --no-deps --no-build-isolation -e .`)."""
import os
import time

os.environ.setdefault("LMCOURSE_PROFILE", "full")   # the full run uses the full sizes

import lmcourse  # noqa: F401,E402  (first: sets TRITON_INTERPRET when no GPU is visible)

from lmcourse.bench import gpu_available, save_result  # noqa: E402
from lmcourse.copying import (benchmark_induction_attention, copying_milestones, copying_run, induction_layers,  # noqa: E402
                              train_copying)


def _benchmark(seq_lens) -> list[dict]:
    "benchmark_induction_attention at `seq_lens`; summary: the statistics' overhead over the plain forward, and eager's."
    start = time.perf_counter()
    result = benchmark_induction_attention(seq_lens)
    print("saved", save_result("copying", "benchmark", result), f"{time.perf_counter() - start:.0f} s")
    by = {(r["provider"], r["seq_len"]): r for r in result["rows"]}
    rows = []
    for r in result["rows"]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    for T in sorted({r["seq_len"] for r in result["rows"]}):
        plain, stats = by[("plain forward (STATS off)", T)], by[("statistics forward (STATS on)", T)]
        eager = by[("eager probabilities + statistics", T)]
        rows.append(dict(metric=f"statistics / plain forward time, T={T}", measured=round(stats["ms"] / plain["ms"], 3), target="< 1.10"))
        rows.append(dict(metric=f"eager / statistics time, T={T}", measured=round(eager["ms"] / stats["ms"], 2), target="reported"))
        rows.append(dict(metric=f"eager / statistics peak memory, T={T}", measured=round(eager["peak_mib"] / stats["peak_mib"], 1),
                         target="reported"))
        rows.append(dict(metric=f"statistics vs eager, max abs error, T={T}", measured=f"{stats['stats_abs_error']:.1e}",
                         target="<= 2e-2 (bf16 inputs)"))
    return rows


def bench(budget) -> list[dict]:
    """make gpu: T = 2k and 8k (16k tokens a batch, 12 heads of 64, bf16). About 20 s (estimated): the Cog forward with STATS
    off and on, 2 autotune configs each (LMCOURSE_AUTOTUNE_MAX=2): 4 compiles; eager attention; 6 timed points."""
    return _benchmark((2048, 8192))


def sweep(budget) -> list[dict]:
    "By hand: the whole sweep, T = 1k, 2k, 4k, 8k."
    return _benchmark((1024, 2048, 4096, 8192))


def full(budget) -> list[dict]:
    "Four 6-layer arms while time remains: batch 64 (baseline), batch 32 (half the tokens per step), weight decay 0.1 and 0.3."
    start = time.perf_counter()
    run = copying_run()
    arms = [("baseline: batch 64, wd 0", {}), ("batch 32, wd 0", {"batch_size": 32}), ("batch 64, wd 0.1", {"weight_decay": 0.1}),
            ("batch 64, wd 0.3", {"weight_decay": 0.3})]
    runs, rows, per_arm = [], [], None
    for name, overrides in arms:
        if per_arm is not None and budget.left() < 1.2 * per_arm + 20:
            budget.skip(name)
            continue
        t0 = time.perf_counter()
        model, history, metrics = train_copying(run, seed=0, device="cuda", **overrides)
        per_arm = max(per_arm or 0.0, time.perf_counter() - t0)
        tokens_per_step = history.tokens / run.train.steps
        ms = copying_milestones(history)
        runs.append(dict(arm=name, overrides=overrides, seconds=time.perf_counter() - t0, tokens_per_step=tokens_per_step,
                         milestones=ms, metrics=history.metrics, metric_steps=history.metric_steps,
                         induction_layers=induction_layers(metrics.records),
                         final_induction=metrics.records[-1]["induction"].tolist(), final_ov=metrics.records[-1]["ov"].tolist()))
        copy_tokens = None if ms["copy_step"] is None else ms["copy_step"] * tokens_per_step
        print(name, ms, f"copy milestone at {copy_tokens} tokens", f"{runs[-1]['seconds']:.0f} s", flush=True)
        rows.append(dict(metric=f"{name}: copy milestone (acc > 0.3), step / tokens",
                         measured=f"{ms['copy_step']} / {copy_tokens}", target="batch sizes align in steps, not tokens (paper)"))
    result = dict(runs=runs, model=run.model.__dict__, train=run.train.__dict__, task=run.task.__dict__,
                  seconds=time.perf_counter() - start)
    print("saved", save_result("copying", "full_run", result), f"{result['seconds']:.0f} s")
    return rows


PARTS = {"bench": (20, bench), "full": (480, full)}   # make gpu, make gpu-run CHAPTER=copying (seconds, estimated)
BY_HAND = {"sweep": (60, sweep)}   # estimated seconds, not measured

if __name__ == "__main__":
    if not gpu_available():
        raise SystemExit("no CUDA device: this script only runs on a GPU machine")
    from gpu import run_cli
    run_cli({**BY_HAND, **PARTS})
