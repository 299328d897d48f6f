"""GPU run of the factual-recall chapter (nbs/08_recall.ipynb, lmcourse.recall); results go to results/recall/.

Parts (see scripts/gpu.py and results/README.md):
    make gpu-run CHAPTER=recall          # `full`: train the 6-layer model on the generated knowledge base (3000 steps
                                         #  of 256 statements), then patching, attention, decomposition and the logit
                                         #  lens on every relation; <= 8 min (estimated, not measured)
    python scripts/recall_gpu.py full --seed 0   # the same in this process, no time limit

No Triton kernels in this chapter yet, so nothing here for `make gpu`'s `tests` part and no compiles; the model is
not compiled (TrainConfig.compile=False).
"""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "full")

import lmcourse  # noqa: F401  (first, as everywhere)

from lmcourse.bench import save_result
from lmcourse.recall import recall_experiment_config, run_recall_experiment


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


PARTS = {"full": (480, full)}   # make gpu-run CHAPTER=recall


if __name__ == "__main__":   # python scripts/recall_gpu.py [full | all] [--seed N]: no time limit
    from gpu import run_cli
    run_cli(PARTS)
