"""GPU parts of the foundations chapters, run by scripts/gpu.py (`make gpu`, `make gpu-run CHAPTER=foundations`):
the RMSNorm benchmark sweep (results/rmsnorm/{forward,backward}.json) and the full baseline run (results/baseline/full.json).
The RMSNorm kernel's correctness on the GPU, bf16 included, is the `tests` part (tests/test_rmsnorm.py, `-m gpu`).

Also by hand, on a GPU machine from the repository root (no nbdev or Jupyter needed there):
    pip install --no-deps --no-build-isolation -e .
    python scripts/foundations_gpu.py [bench|sweep|full|all]
    torchrun --nproc_per_node=N scripts/foundations_gpu.py full      # the baseline under DDP
The baseline reads the stdlib+site corpus (reading and tokenizing it are outside the timed window), trains at most
2 epochs of it (lmcourse.baseline.fit_to_epochs) and stores what it did: its TrainConfig, tokens, epochs, the corpus
versions, tokens/s in total and per GPU over the steady-state window, and MFU against the nominal peak it states."""
import lmcourse  # noqa: F401  (first)

from lmcourse.bench import device_spec, save_result, speedups


def _benchmark(ns) -> list[dict]:
    "RMSNorm forward and forward+backward, M = 16384 rows, bf16, at these hidden sizes (8192: the kernel's maximum)."
    from lmcourse.rmsnorm import benchmark_rmsnorm
    rows = []
    for mode, result in benchmark_rmsnorm(ns=ns).items():
        print(save_result("rmsnorm", mode, result))
        ours = [r for r in result["rows"] if r["provider"] == "triton (lmcourse)" and r["hidden"] == 8192][0]
        vs = {r["provider"]: r["speedup"] for r in speedups(result, "torch.compile") if r["hidden"] == 8192}
        rows += [{"metric": f"rmsnorm {mode} N=8192: fraction of copy bandwidth",
                  "measured": round(ours["tbps"] / device_spec().hbm_tbps, 2), "target": ">= 0.8 (perf_anchors: Liger 0.92)"},
                 {"metric": f"rmsnorm {mode} N=8192: speed-up over torch.compile",
                  "measured": round(vs["triton (lmcourse)"], 2), "target": ">= 1.0"}]
    return rows


def bench(budget):
    """make gpu: hidden 8192 only. About 15 s (estimated): 2 kernel compiles, `torch.compile` of the reference forward
    and forward+backward (2 graphs, the slowest step), 8 timed points."""
    return _benchmark((8192,))


def sweep(budget):
    "By hand: hidden 1024, 4096 and 8192."
    return _benchmark((1024, 4096, 8192))


def full(budget):
    "The baseline model's full run (lmcourse.baseline, profile full)."
    from lmcourse.baseline import main
    history = main(["--profile", "full"])
    return [{"metric": "baseline tokens/s per GPU (steady state)", "measured": round(history.tokens_per_s_per_device),
             "target": "recorded; MFU in results/baseline/full.json"}]


PARTS = {"bench": (15, bench), "full": (480, full)}   # seconds (estimated); see results/README.md
BY_HAND = {"sweep": (60, sweep)}


if __name__ == "__main__":   # python scripts/foundations_gpu.py [bench | sweep | full | all]: in this process, no time limit
    from gpu import run_cli
    run_cli({**BY_HAND, **PARTS})
