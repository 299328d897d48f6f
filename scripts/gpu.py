"""`make gpu`: what a maintainer runs on one H100/H200 (torch 2.11 + Triton 3.6 preinstalled, no network; no
nbdev, nbval or datasets), in at most 9 minutes of wall time. `make gpu-run CHAPTER=name`: one chapter's full run.

    python scripts/gpu.py                 # install this checkout, then every part below; a summary at the end
    python scripts/gpu.py --full cog      # one chapter's `full` part (<= 8 minutes)
    python scripts/gpu.py --only cog:bench tests
    python scripts/gpu.py --dry-run       # list the parts and budgets and check they fit (CPU; run by the tests)

Parts, in order, each with its own time budget:
- `tests`: every kernel's correctness tests on the GPU in bf16, fp16 and fp32 against float64 — `pytest tests -m gpu`
  (which writes results/verified/<gpu>.json), after a warm-up that compiles the kernels in TEST_PROCESSES processes,
  each with a share of every test file;
- one or more parts per chapter, declared by `scripts/<chapter>_gpu.py` in a `PARTS` dict:
  name -> (seconds, function). The function takes a `Budget` (`.left()` seconds, `.skip(what, why)`) and returns
  summary rows `{"metric", "measured", "target"}`; it writes `results/<chapter>/*.json` through
  `lmcourse.bench.save_result` (device, versions, commit, date). The part named `full` runs only with `--full`.

Every part runs in its own process, killed when it exceeds its budget (plus a small grace); what it skipped and why
is reported, and a failure in one part does not stop the others. Benchmark parts run one after another (they must
not share the GPU) with `LMCOURSE_AUTOTUNE_MAX=2`: autotuned kernels try their first two configs only.
The summary (status, seconds used of budget, skipped, measured vs target) is printed and saved to
results/gpu_summary.json. Expected times: results/README.md.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
MAKE_GPU_S = 540            # `make gpu` wall-time budget: 9 minutes
SETUP_S = 20                # installing the checkout (~5-10 s), the summary; each part counts its own process start
FULL_RUN_S = 480            # `make gpu-run`: 8 minutes
TESTS_S = 160               # `pytest -m gpu` over every test file: the warm-up and the run that counts
TEST_PROCESSES = 12         # warm-up processes (the GPU machine has 16 cores; compiling is CPU-bound, one core each)
GRACE = 1.1                 # a part is killed at 110% of its budget


class Budget:
    "The time a part may use: `left()` seconds remain; `skip(what, why)` records work left out (reported)."
    def __init__(self, seconds: float):
        self.seconds, self.start, self.skipped = seconds, time.monotonic(), []

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def skip(self, what: str, why: str = "out of time"):
        self.skipped.append(f"{what} ({why})")
        print(f"skipped: {what} ({why})", flush=True)


def run_cli(parts: dict, argv=None):
    """A chapter script's own command line, `python scripts/<chapter>_gpu.py [PART ...] [--seed N]`: its parts (default:
    all, `full` last) in this process, without time limits; `--seed` is passed to parts that take one."""
    import inspect
    parser = argparse.ArgumentParser(description=f"parts: {', '.join(parts)}")
    parser.add_argument("parts", nargs="*", choices=[*parts, "all"], default=["all"])
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    names = list(parts) if "all" in args.parts else args.parts
    for name in names:
        seconds, fn = parts[name]
        kwargs = {"seed": args.seed} if args.seed is not None and "seed" in inspect.signature(fn).parameters else {}
        for row in fn(Budget(float("inf")), **kwargs) or []:
            print(row)


def chapter_parts() -> dict[str, dict[str, tuple[float, object]]]:
    "`PARTS` of every scripts/<chapter>_gpu.py, by chapter."
    found = {}
    for path in sorted(SCRIPTS.glob("*_gpu.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parts = getattr(module, "PARTS", None)
        if not isinstance(parts, dict) or not parts:
            raise SystemExit(f"{path.relative_to(ROOT)} has no PARTS dict: name -> (seconds, function(budget))")
        for name, entry in parts.items():
            if not (isinstance(entry, tuple) and len(entry) == 2 and entry[0] > 0 and callable(entry[1])):
                raise SystemExit(f"{path.name}: PARTS[{name!r}] must be (seconds, function), got {entry!r}")
        found[path.stem.removesuffix("_gpu")] = parts
    return found


def gpu_test_files() -> list[Path]:
    "Test files with kernel tests marked `@pytest.mark.gpu`."
    return [p for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]


def gpu_test_ids(timeout: float = 120) -> list[str]:
    "Node ids of every `@pytest.mark.gpu` test, in file order (`pytest --collect-only`)."
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return [line.strip() for line in done.stdout.splitlines() if "::" in line]


def warm_up_chunks(test_ids: list[str], n: int) -> list[list[str]]:
    """At most `n` chunks of test ids, dealt round-robin so that every chunk holds a share of every file. The files differ
    a hundredfold in what they compile (recorded on CPU: 102 kernel specialisations for tests/test_moice.py, 1 for
    tests/test_batch_icl.py; 594 in all), so one process per file would leave the largest compiling alone at the end."""
    return [chunk for chunk in (test_ids[i::n] for i in range(n)) if chunk]


def plan(full: str | None, only: list[str]) -> list[tuple[str, float]]:
    "(part id, budget) in running order: `tests`, then `<chapter>:<part>`."
    chapters = chapter_parts()
    if full is not None:
        if full not in chapters or "full" not in chapters[full]:
            raise SystemExit(f"no full run for {full!r}; chapters with one: {[c for c in chapters if 'full' in chapters[c]]}")
        return [(f"{full}:full", chapters[full]["full"][0])]
    steps = [("tests", TESTS_S)] + [(f"{chapter}:{name}", seconds) for chapter, parts in chapters.items()
                                    for name, (seconds, _) in parts.items() if name != "full"]
    if only:
        unknown = set(only) - {step for step, _ in steps}
        if unknown:
            raise SystemExit(f"unknown parts {sorted(unknown)}; parts: {[step for step, _ in steps]}")
        steps = [(step, seconds) for step, seconds in steps if step in only]
    return steps


def _pytest(args: list, timeout: float) -> tuple[str, str]:
    "(status, last line) of one pytest process run from the repository root."
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed", f"stopped at the tests part's budget ({timeout:.0f} s)"
    tail = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode not in (0, 5):   # 5: no test selected
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
    return ("ok" if done.returncode in (0, 5) else "failed"), tail


def run_tests(budget: Budget) -> dict:
    """The `tests` part. Compiling is what takes the time, and one Python process compiles one kernel at a time, so
    first the GPU tests run in TEST_PROCESSES processes at once, each with a share of every file (this fills Triton's
    kernel cache); then `pytest tests -m gpu` runs once over the whole folder — all cache hits — and is what counts:
    `lmcourse.verified` writes its record, results/verified/<gpu>.json, only for a run over the whole folder."""
    chunks = warm_up_chunks(gpu_test_ids(), TEST_PROCESSES)

    def warm(index: int) -> tuple[str, str]:
        left = budget.left() - 0.3 * budget.seconds       # keep 30% of the budget for the run that counts
        if left < 10:
            budget.skip(f"warm-up chunk {index} ({len(chunks[index])} tests)")
            return "skipped", ""
        status, tail = _pytest(chunks[index], left)
        print(f"warm-up chunk {index} ({len(chunks[index])} tests): {tail}", flush=True)
        return status, tail

    with ThreadPoolExecutor(TEST_PROCESSES) as pool:
        warmed = {f"chunk {i}": result for i, result in enumerate(pool.map(warm, range(len(chunks))))}
    if budget.left() < 10:
        budget.skip("pytest tests -m gpu (the run that writes results/verified/)")
        return {"rows": [{"metric": f"warm-up {name}", "measured": tail or status, "target": "all pass"}
                         for name, (status, tail) in warmed.items()], "failed": ["tests"]}
    status, tail = _pytest(["tests"], budget.left())
    print(f"pytest tests -m gpu: {tail}", flush=True)
    rows = [{"metric": "pytest tests -m gpu (every kernel test, bf16 included)", "measured": tail, "target": "all pass"}]
    return {"rows": rows, "failed": [] if status == "ok" else ["tests"]}


def run_part(step: str, seconds: float, report: Path):
    "Child process: run one part, write its report (rows, skipped, error) as JSON."
    budget = Budget(seconds)
    out = {"rows": [], "skipped": budget.skipped, "error": None}
    try:
        if step == "tests":
            result = run_tests(budget)
            out["rows"] = result["rows"]
            if result["failed"]:
                out["error"] = f"GPU tests failed in {result['failed']}"
        else:
            chapter, name = step.split(":")
            out["rows"] = list(chapter_parts()[chapter][name][1](budget) or [])
    except Exception as e:   # reported in the summary; the other parts still run
        import traceback
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    report.write_text(json.dumps(out, default=str))


def run_step(step: str, seconds: float, full: bool) -> dict:
    "Run one part in its own process with a hard time limit; return its summary."
    env = dict(os.environ)
    if not full:
        env.setdefault("LMCOURSE_AUTOTUNE_MAX", "2")
    if step != "tests":                           # the tests keep their own (smoke) sizes
        env.setdefault("LMCOURSE_PROFILE", "full")
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "report.json")
        print(f"\n== {step} (budget {seconds:.0f} s)", flush=True)
        try:
            done = subprocess.run([sys.executable, __file__, "--child", step, "--budget", str(seconds), "--report", str(report)],
                                  cwd=ROOT, env=env, timeout=seconds * GRACE)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"killed after {seconds * GRACE:.0f} s"
        result = json.loads(report.read_text()) if report.exists() else {"rows": [], "skipped": [], "error": None}
    if result.get("error"):
        status = "failed: " + result["error"]
    return {"part": step, "status": status, "seconds": round(time.monotonic() - start, 1), "budget": seconds, **result}


def print_summary(summaries: list[dict], total_s: float):
    print("\n" + "=" * 100 + f"\nmake gpu summary ({total_s:.0f} s)")
    for s in summaries:
        print(f"{s['part']:<22} {s['status'][:60]:<60} {s['seconds']:>6.0f} s of {s['budget']:.0f}")
        for what in s.get("skipped", []):
            print(f"{'':<22}   skipped: {what}")
        for row in s.get("rows", []):
            print(f"{'':<22}   {str(row.get('metric'))[:60]:<60} measured {row.get('measured')}  target {row.get('target')}")


def dry_run(steps: list[tuple[str, float]], full: str | None) -> int:
    "List the parts and budgets; fail when they do not fit (or a full run exceeds its 8 minutes)."
    chapters = chapter_parts()
    for step, seconds in steps:
        print(f"{step:<24} {seconds:>5.0f} s")
    print(f"{'tests':<24} files: {', '.join(p.name for p in gpu_test_files())}")
    fulls = {chapter: parts["full"][0] for chapter, parts in chapters.items() if "full" in parts}
    print("full runs (make gpu-run CHAPTER=...):", ", ".join(f"{c} {s:.0f} s" for c, s in fulls.items()))
    problems = [f"{c}: full run budget {s:.0f} s > {FULL_RUN_S} s" for c, s in fulls.items() if s > FULL_RUN_S]
    if full is None:
        total = SETUP_S + sum(seconds for _, seconds in steps)
        print(f"make gpu: {total:.0f} s of {MAKE_GPU_S} s (setup {SETUP_S} s included)")
        if total > MAKE_GPU_S:
            problems.append(f"the parts need {total:.0f} s, more than make gpu's {MAKE_GPU_S} s: trim a sweep")
    for problem in problems:
        print("budget problem:", problem)
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", metavar="CHAPTER", help="run CHAPTER's full part only (make gpu-run)")
    parser.add_argument("--only", nargs="+", default=[], metavar="PART", help="run only these parts (tests, chapter:part)")
    parser.add_argument("--dry-run", action="store_true", help="list parts and budgets, check the total; no GPU needed")
    parser.add_argument("--chapters", action="store_true", help="print the chapters that have a full run")
    parser.add_argument("--no-install", action="store_true", help="do not pip install this checkout first")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_part(args.child, args.budget, args.report)
        return 0
    if args.chapters:
        print(" ".join(c for c, parts in chapter_parts().items() if "full" in parts))
        return 0
    steps = plan(args.full, args.only)
    if args.dry_run:
        return dry_run(steps, args.full)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("make gpu needs a CUDA GPU (this machine has none); try `python scripts/gpu.py --dry-run`")
    start = time.monotonic()
    if not args.no_install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
                       cwd=ROOT, check=True)
    summaries = [run_step(step, seconds, args.full is not None) for step, seconds in steps]
    total = time.monotonic() - start
    print_summary(summaries, total)
    from lmcourse.bench import env_info, results_root
    name = f"gpu_run_{args.full}.json" if args.full else "gpu_summary.json"
    results_root().mkdir(parents=True, exist_ok=True)
    (results_root() / name).write_text(json.dumps({"env": env_info(), "seconds": round(total), "parts": summaries},
                                                  indent=1, default=str))
    return 0 if all(s["status"] == "ok" for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
