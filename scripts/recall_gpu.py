"""GPU run of the factual-recall chapter (nbs/08_recall.ipynb, lmcourse.recall); results go to results/recall/.

Parts (see scripts/gpu.py and results/README.md):
    make gpu-run CHAPTER=recall          # `full`: train the 6-layer model on the generated knowledge base (3000 steps
                                         #  of 256 statements), then patching, attention, decomposition and the logit
                                         #  lens on every relation; <= 8 min (estimated, not measured)
    python scripts/recall_gpu.py full --seed 0   # the same in this process, no time limit
    python scripts/recall_gpu.py bench           # make gpu's part: the head-attribution kernel against the einsum
                                                 #  over per-head outputs and cuBLAS at a 7B-like shape, 1k positions;
                                                 #  results/recall/bench.json; about 15 s (estimated)
    python scripts/recall_gpu.py sweep           # the same at 256, 512 and 1k positions (by hand)

The chapter's kernel tests (`pytest tests/test_recall.py -m gpu`) run in `make gpu`'s `tests` part. Compiles: the
attribution kernel once per (positions, provider) shape class, one head dim: a handful; no autotuning. The model is not
compiled (TrainConfig.compile=False).
"""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")

import lmcourse  # noqa: F401  (first, as everywhere)

from lmcourse.bench import save_result, speedups
from lmcourse.recall import benchmark_head_attribution, recall_experiment_config, run_recall_experiment


def _benchmark(positions) -> list[dict]:
    "Head attribution at 32 layers x 32 heads, d = 4096, bf16, at these numbers of positions: results/recall/bench.json."
    result = benchmark_head_attribution(positions)
    print("saved", save_result("recall", "bench", result))
    return [{"metric": f"{row['provider']} at {row['positions']} positions: speedup over the einsum",
             "measured": round(row["speedup"], 2), "target": "> 1 for triton (no [B, L, H, d] tensor)"}
            for row in speedups(result["sweep"], "einsum over per-head outputs")]


def bench(budget):
    """make gpu: 1k positions. About 15 s (estimated): one kernel compile (no autotuning), 1 GiB of W_O to fill, 3 timed
    providers."""
    return _benchmark((1024,))


def sweep(budget):
    "By hand: 256, 512 and 1k positions."
    return _benchmark((256, 512, 1024))


def full(budget, seed: int = 0):
    "The chapter's full experiment, one seed: results/recall/full_seed<seed>.json."
    result = run_recall_experiment(recall_experiment_config(), seed=seed)
    print("saved", save_result("recall", f"full_seed{seed}", result))
    rows = []
    for r in result["relations"]:
        l, h = r["top_head"]
        mid, out = r["lens"]["p_answer"][-2], r["lens"]["p_answer"][-1]
        rows += [{"metric": f"{r['relation']}: accuracy", "measured": round(r["accuracy"], 3), "target": ">= 0.95"},
                 {"metric": f"{r['relation']}: top head {l}.{h} patching effect", "measured": round(r["head_effect"][l][h], 3),
                  "target": "large negative (mover head)"},
                 {"metric": f"{r['relation']}: final layer P(answer) mid -> output", "measured": f"{mid:.3f} -> {out:.3f}",
                  "target": "falls (paper: 0.524 -> 0.291, Llama-2-7B-chat)"}]
    return rows


PARTS = {"bench": (15, bench), "full": (480, full)}   # make gpu, make gpu-run CHAPTER=recall (seconds, estimated)
BY_HAND = {"sweep": (60, sweep)}   # estimated seconds, not measured


if __name__ == "__main__":   # python scripts/recall_gpu.py [full | all] [--seed N]: no time limit
    from gpu import run_cli
    run_cli({**BY_HAND, **PARTS})
