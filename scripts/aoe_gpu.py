"""GPU parts of the Autonomy-of-Experts chapter (nbs/05_aoe.ipynb), run by scripts/gpu.py (`make gpu`,
`make gpu-run CHAPTER=aoe`): the layer benchmark (results/aoe/layer_benchmark.json; `sweep`, by hand, at both shapes) and, as the full run, the AoE vs
router-MoE language models at the full size, seed 0 (results/aoe/lm_seed0.json)."""
import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET when no GPU is visible)

from lmcourse.aoe import BENCH_SHAPES, LM_SIZES, benchmark_summary, layer_benchmark, lm_data, lm_run
from lmcourse.bench import save_result


def _benchmark(budget, shapes) -> list[dict]:
    "Forward and forward+backward of every provider at these benchmark shapes (BENCH_SHAPES: mixtral-like, fine-grained)."
    result = layer_benchmark({name: BENCH_SHAPES[name] for name in shapes})
    print(save_result("aoe", "layer_benchmark", result))
    for row in result["rows"]:
        if row.get("error"):
            budget.skip(f"{row['provider']} {row['shape']} {row['mode']}", row["error"][:120])
    return [{"metric": f"{r['shape']} {r['mode']} {r['provider']}: vs its loop, of dense TFLOP/s",
             "measured": f"{r['vs_loop']}x, {r['of_dense']}", "target": "triton > loop on fine-grained"}
            for r in benchmark_summary(result) if r["provider"] in ("aoe-triton", "moe-triton")]


def bench(budget):
    """make gpu: the fine-grained shape (64 experts, top-8, 16k tokens), where grouping matters. About 25 s (estimated):
    5 kernels compiled once (fixed blocks), 14 timed points, the loop providers the slowest."""
    return _benchmark(budget, ("fine-grained",))


def sweep(budget):
    "By hand: both shapes (the mixtral-like shape's loop provider takes ~50 ms a call)."
    return _benchmark(budget, tuple(BENCH_SHAPES))


def full(budget, seed: int = 0):
    "AoE and router-MoE LMs at the full size (LM_SIZES['full']), one seed."
    size = dict(LM_SIZES["full"])
    data = lm_data(size)                     # (tokenizer, get_batch, train tokens): one corpus for both models
    runs = [lm_run(kind, size, seed=seed, data=data, progress=True) for kind in ("aoe", "moe")]
    print(save_result("aoe", f"lm_seed{seed}", {"runs": runs}))
    return [{"metric": f"{r['kind']} final val loss, seed {seed}", "measured": round(r["final_val_loss"], 4),
             "target": "aoe <= moe (paper)"} for r in runs]


PARTS = {"bench": (25, bench), "full": (480, full)}   # seconds (estimated); see results/README.md
BY_HAND = {"sweep": (60, sweep)}


if __name__ == "__main__":   # python scripts/aoe_gpu.py [bench | sweep | full [--seed N] | all]: in this process, no time limit
    from gpu import run_cli
    run_cli({**BY_HAND, **PARTS})
