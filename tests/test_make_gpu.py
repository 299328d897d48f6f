"`make gpu`'s driver (scripts/gpu.py) on a machine without a GPU: its parts parse, their budgets fit, a failing part is reported."
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_driver", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_every_part_within_budget():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for part in ("tests", "foundations:bench", "polarquant:bench", "cog:bench", "aoe:bench", "moice:bench", "mom:bench",
                 "pear:bench", "recall:bench", "masked_thought:bench", "batch_icl:bench", "copying:bench"):
        assert part in done.stdout
    assert "test_rmsnorm.py" in done.stdout and "of 540 s" in done.stdout


# Chapters without a benchmark of their own: DrICL's kernel is the fused loss, which losses:bench measures.
NO_BENCHMARK = {"dricl"}


def test_every_chapter_script_declares_parts(gpu):
    parts = gpu.chapter_parts()
    assert {"foundations", "polarquant", "cog", "aoe"} <= set(parts)
    without = {chapter for chapter, table in parts.items() if "bench" not in table}
    assert without == NO_BENCHMARK, f"every chapter's benchmark is a make gpu part; without one: {sorted(without - NO_BENCHMARK)}"
    for chapter, table in parts.items():
        assert table["full"][0] <= gpu.FULL_RUN_S, chapter
    steps = gpu.plan(None, [])
    assert steps[0] == ("tests", gpu.TESTS_S) and all(not step.endswith(":full") for step, _ in steps)
    assert gpu.SETUP_S + sum(seconds for _, seconds in steps) <= gpu.MAKE_GPU_S
    assert gpu.plan("cog", []) == [("cog:full", parts["cog"]["full"][0])]
    with pytest.raises(SystemExit, match="no full run"):
        gpu.plan("nonesuch", [])


def test_a_failing_part_is_reported_not_raised(gpu, tmp_path, monkeypatch):
    def broken(budget):
        budget.skip("the second half", "demo")
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(gpu, "chapter_parts", lambda: {"demo": {"bench": (5, broken)}})
    report = tmp_path / "report.json"
    gpu.run_part("demo:bench", 5, report)
    text = report.read_text()
    assert "RuntimeError: kernel exploded" in text and "the second half (demo)" in text


def test_budget_counts_down(gpu):
    budget = gpu.Budget(100)
    assert 99 < budget.left() <= 100
    budget.skip("x")
    assert budget.skipped == ["x (out of time)"]


class _Called(Exception):
    "Raised by a stand-in benchmark: the part got as far as its first benchmark call, with arguments it accepts."


def test_bench_parts_call_their_benchmarks_with_arguments_they_accept(gpu, monkeypatch):
    """Every `bench` part, run on the CPU with its benchmark functions replaced: the first benchmark it calls must accept
    the sizes the part passes (a wrong keyword or count fails here, not on the GPU machine). GPU-only checks the part
    runs first (`check`) are skipped."""
    import inspect

    import lmcourse.rmsnorm

    def stand_in(real):
        def call(*args, **kwargs):
            inspect.signature(real).bind(*args, **kwargs)       # TypeError when the arguments do not fit
            raise _Called(real.__name__)
        return call

    monkeypatch.setattr(lmcourse.rmsnorm, "benchmark_rmsnorm", stand_in(lmcourse.rmsnorm.benchmark_rmsnorm))
    checked = []
    for chapter, table in gpu.chapter_parts().items():
        if "bench" not in table:
            continue
        namespace = table["bench"][1].__globals__
        for name, obj in list(namespace.items()):
            if callable(obj) and "benchmark" in name and not name.startswith("_") and not name.endswith("summary"):
                monkeypatch.setitem(namespace, name, stand_in(obj))
            elif name == "check" and callable(obj):
                monkeypatch.setitem(namespace, name, lambda *a, **k: None)
        by_hand = namespace.get("BY_HAND", {})
        for part, (_, fn) in [("bench", table["bench"]), *([("sweep", by_hand["sweep"])] if "sweep" in by_hand else [])]:
            with pytest.raises(_Called):
                fn(gpu.Budget(1000))
            checked.append(f"{chapter}:{part}")
    assert {"cog:sweep", "moice:bench", "recall:sweep"} <= set(checked)


def test_warm_up_chunks_spread_every_file_over_the_processes(gpu):
    ids = [f"tests/test_big.py::t[{i}]" for i in range(100)] + [f"tests/test_small.py::t[{i}]" for i in range(3)]
    chunks = gpu.warm_up_chunks(ids, 12)
    assert len(chunks) == 12 and sorted(sum(chunks, [])) == sorted(ids)          # every test once
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1                   # balanced
    assert all(any("test_big" in t for t in chunk) for chunk in chunks)         # the big file on every process
    assert gpu.warm_up_chunks(ids[:5], 12) == [[t] for t in ids[:5]]            # never an empty chunk
