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
    python scripts/recall_gpu.py gpt2            # by hand only (BY_HAND): GPT-2's head ranking when its weights are local
                                                 #  ($LMCOURSE_GPT2_PATH or the HF cache; never downloaded), else skipped
                                                 #  with the reason; results/recall/gpt2_heads.json; < 60 s (estimated)

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


def gpt2(budget):
    """The paper's GPT-2 head ranking (`rank_heads_hf`: path patching at END on capital-of prompts) when GPT-2's weights
    are on this machine ($LMCOURSE_GPT2_PATH or the Hugging Face cache; never downloaded): results/recall/gpt2_heads.json;
    otherwise skipped, with the reason."""
    import torch

    from lmcourse.recall import rank_heads_hf
    target = "movers of the paper's code: 7.8, 9.8, 10.0, 11.2, 11.3; negative heads 10.7, 11.10"
    try:
        ranking = rank_heads_hf(device="cuda" if torch.cuda.is_available() else "cpu")
    except FileNotFoundError as e:
        budget.skip("GPT-2 head ranking", str(e))
        return [{"metric": "GPT-2 head ranking", "measured": "skipped: no local weights", "target": target}]
    result = {"effect": ranking.effect.tolist(), "attribution": ranking.attribution.tolist(), "order": ranking.order,
              "n_prompts": ranking.n_prompts, "clean_metric": ranking.clean_metric, "metric": "logit - mean logit (vocabulary)"}
    print("saved", save_result("recall", "gpt2_heads", result))
    return [{"metric": "GPT-2 heads by path-patching effect (most negative first)",
             "measured": ", ".join(f"{l}.{h} ({e:+.2f})" for l, h, e in ranking.top(8)), "target": target},
            {"metric": "GPT-2 heads with the largest positive effect",
             "measured": ", ".join(f"{l}.{h} ({ranking.effect[l, h].item():+.2f})" for l, h in ranking.order[::-1][:3]),
             "target": "negative heads 10.7, 11.10"}]


PARTS = {"bench": (15, bench), "full": (480, full)}   # make gpu, make gpu-run CHAPTER=recall (seconds, estimated)
BY_HAND = {"sweep": (60, sweep), "gpt2": (60, gpt2)}   # estimated seconds, not measured


if __name__ == "__main__":   # python scripts/recall_gpu.py [full | all] [--seed N]: no time limit
    from gpu import run_cli
    run_cli({**BY_HAND, **PARTS})
