"""lmcourse.verified: the test-suite record (through a real pytest run of a toy suite), the box on fixture results,
and the conventions that let a new chapter get its box (kernels found, results declared)."""
import json
import re
from pathlib import Path

import pytest

import lmcourse.verified as verified
from lmcourse.bench import save_result

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["pytester"]

TOY_TESTS = '''
import torch, triton, triton.language as tl
from lmcourse.testing import assert_close

def _double(x, y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + o, {factor} * tl.load(x + o, mask=o < n), mask=o < n)
_double.__module__ = "lmcourse.toy"          # as if defined in the chapter module lmcourse.toy
_double = triton.jit(_double)

def launch(dtype):
    x = torch.randn(70, dtype=dtype); y = torch.empty_like(x)
    _double[(3,)](x, y, 70, BLOCK=32)
    return x, y

def test_vs_float64():
    x, y = launch(torch.float32)
    assert_close(y, 2 * x.double())

def test_fp16_without_reference():
    x, y = launch(torch.float16)
    assert y.shape == x.shape

def test_no_kernel():
    assert True
'''


@pytest.fixture
def toy_suite(pytester, tmp_path, monkeypatch):
    "A project with tests/test_toy.py; runs pytest on it with the plugin, results in a temporary results/."
    results = tmp_path / "results"
    monkeypatch.setenv("LMCOURSE_RESULTS", str(results))
    monkeypatch.delenv("LMCOURSE_VERIFIED", raising=False)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    (pytester.path / "tests").mkdir()

    def run(*args, factor=2, subprocess=False):
        (pytester.path / "tests" / "test_toy.py").write_text(TOY_TESTS.format(factor=factor))
        runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest
        result = runner("-p", "lmcourse.verified", *args)
        path = results / "verified" / f"{verified.device_kind()}.json"
        return result, (json.loads(path.read_text()) if path.exists() else None)
    return run


def test_full_run_records_kernels_per_test(toy_suite):
    result, record = toy_suite("tests")
    result.assert_outcomes(passed=3)
    k = record["kernels"]["toy"]["_double"]
    assert k == {"passed": 2, "failed": 0, "float64": 1, "dtypes": ["float16", "float32"]}
    assert record["tests"]["tests/test_toy.py"] == {"passed": 3, "failed": 0, "skipped": 0}
    assert record["kind"] == verified.device_kind() and record["env"]["torch"]


def test_partial_runs_leave_the_record_alone_and_failures_are_recorded(toy_suite):
    _, first = toy_suite("tests")
    result, after = toy_suite("tests/test_toy.py", factor=3)            # a file, not the suite: kernel now wrong
    result.assert_outcomes(passed=2, failed=1)
    assert after == first
    _, after = toy_suite("tests", "-k", "float64", factor=3)
    assert after == first
    _, after = toy_suite("tests", factor=3)                             # the full suite: the failure is recorded
    assert after["kernels"]["toy"]["_double"]["failed"] == 1 and after["tests"]["tests/test_toy.py"]["failed"] == 1


def test_record_is_rewritten_only_when_its_content_changes(toy_suite, tmp_path):
    _, first = toy_suite("tests")
    path = tmp_path / "results" / "verified" / f"{verified.device_kind()}.json"
    stamped = {**first, "env": {**first["env"], "date": "2000-01-01T00:00:00+00:00", "git_commit": "old"}}
    path.write_text(json.dumps(stamped))
    _, again = toy_suite("tests")
    assert again["env"]["date"] == "2000-01-01T00:00:00+00:00"        # same content: not rewritten


def test_record_under_xdist(toy_suite):
    "make test runs under pytest-xdist: the workers' launches reach the controller through the reports."
    pytest.importorskip("xdist")
    result, record = toy_suite("tests", "-n", "1", subprocess=True)   # one worker: the reports still cross processes
    result.assert_outcomes(passed=3)
    assert record["kernels"]["toy"]["_double"]["passed"] == 2


# ---- the box on fixture results ----

@pytest.fixture
def fixture_results(tmp_path):
    (tmp_path / "expected").mkdir()
    (tmp_path / "expected" / "rmsnorm.json").write_text(json.dumps({
        "command": "python scripts/foundations_gpu.py bench",
        "results": {"forward": {"kind": "benchmark"}, "full": {"kind": "full run", "command": "make gpu-run"}}}))
    return tmp_path


def record(kind, device, kernels):
    tests = {f"tests/test_rmsnorm.py::t{i}": {"outcome": outcome, "kernels": {f"rmsnorm.{k}": ["float32"]}, "float64": f64}
             for i, (k, outcome, f64) in enumerate(kernels)}
    return {**verified.suite_record(tests), "kind": kind, "device": device}


def test_box_without_records_says_what_is_missing(fixture_results):
    box = verified.verified_box("rmsnorm", fixture_results)
    s = box.status
    assert s["kernels"] == ["_rmsnorm_bwd_kernel", "_rmsnorm_fwd_kernel"] and s["records"] == {}
    assert [(r["name"], r["command"], r["env"]) for r in s["results"]] == [
        ("forward", "python scripts/foundations_gpu.py bench", None), ("full", "make gpu-run", None)]
    text = box._repr_html_()
    assert "no test-suite record yet" in text and "make gpu" in text and "missing" in text
    assert repr(box) == "Verified (rmsnorm): 2 kernels, no test-suite record yet · not yet run on a GPU · GPU results 0/2 stored"


def test_box_with_cpu_and_gpu_records_and_results(fixture_results):
    verified.write_record(record("cpu-interpreter", "cpu (x86_64)", [("_rmsnorm_fwd_kernel", "passed", True),
                                                                     ("_rmsnorm_bwd_kernel", "passed", False)]), fixture_results)
    verified.write_record(record("nvidia-h200", "NVIDIA H200", [("_rmsnorm_fwd_kernel", "failed", True)]), fixture_results)
    save_result("rmsnorm", "forward", {"rows": []}, results_dir=fixture_results)
    save_result("rmsnorm", "extra", {"rows": []}, results_dir=fixture_results)
    box = verified.verified_box("rmsnorm", fixture_results)
    s = box.status
    assert list(s["records"]) == ["cpu-interpreter", "nvidia-h200"]
    cpu, gpu = s["records"]["cpu-interpreter"]["kernels"], s["records"]["nvidia-h200"]["kernels"]
    assert verified.kernel_verified(cpu["_rmsnorm_fwd_kernel"])
    assert not verified.kernel_verified(cpu["_rmsnorm_bwd_kernel"])   # passed, but never compared with float64
    assert not verified.kernel_verified(gpu["_rmsnorm_fwd_kernel"])   # a failure
    assert [(r["name"], r["kind"], r["env"] is not None) for r in s["results"]] == [
        ("forward", "benchmark", True), ("full", "full run", False), ("extra", "not declared", True)]
    text = box._repr_html_()
    assert "NVIDIA H200" in text and "<b>1 failed</b>" in text and "no test launched it" in text
    assert "kernels 1/2 checked vs float64 on CPU (Triton interpreter)" in repr(box)
    assert "kernels 0/2 checked vs float64 on NVIDIA H200" in repr(box) and "not yet run on a GPU" not in repr(box)


def test_bad_input_is_refused(fixture_results):
    with pytest.raises(ValueError, match="no chapter 'rmsnrom'"):
        verified.verified_box("rmsnrom", fixture_results)
    (fixture_results / "expected" / "rmsnorm.json").write_text(json.dumps({"results": {"x": {"kind": "benchmrak"}}}))
    with pytest.raises(ValueError, match="kind 'benchmrak'"):
        verified.verified_box("rmsnorm", fixture_results)


def test_box_without_a_results_folder(tmp_path):
    box = verified.verified_box("rmsnorm", tmp_path / "nothing")
    assert "installed without a checkout" in box._repr_html_()


def test_overview_has_every_chapter(fixture_results):
    rows = verified.verified_overview(fixture_results).rows
    assert [r["status"]["chapter"] for r in rows] == list(verified.chapter_notebooks())
    assert "<table>" in verified.verified_overview(fixture_results)._repr_html_()


# ---- the conventions ----

def test_kernels_are_found_in_every_chapter():
    assert verified.chapter_kernels("rmsnorm") == ["_rmsnorm_bwd_kernel", "_rmsnorm_fwd_kernel"]
    assert {"_cog_fwd_kernel", "_cog_bwd_dkdv_kernel", "_cog_bwd_dq_kernel"} <= set(verified.chapter_kernels("cog"))
    assert "_cog_bwd_dq_inner" not in verified.chapter_kernels("cog")
    for chapter in verified.chapter_notebooks():
        for kernel in verified.chapter_kernels(chapter):
            assert any(f"def {kernel}(" in f.read_text() for f in verified.module_files(chapter)), (chapter, kernel)


def _literal_results():
    "(chapter, name or None) for every save_result(...) / load_result(...) call with a literal chapter, in scripts/ and nbs/."
    found = set()
    for path in [*ROOT.glob("scripts/*.py"), *ROOT.glob("nbs/*.ipynb")]:
        text = path.read_text().replace('\\"', '"')
        for m in re.finditer(r'(?:save|load|missing)_result\("(\w+)",\s*(f?)"(\w*)"', text):
            found.add((m.group(1), None if m.group(2) else m.group(3)))
    return found


def test_every_stored_or_loaded_result_is_declared():
    "A chapter that stores or plots GPU results declares them in results/expected/<chapter>.json (and nothing else is there)."
    calls, chapters = _literal_results(), verified.chapter_notebooks()
    assert calls, "found no save_result/load_result calls"
    for chapter, name in calls:
        if chapter not in chapters: continue             # demonstrations into temporary folders (00e's "demo")
        declared = verified.expected_results(chapter)
        assert declared, f"results/expected/{chapter}.json is missing (the chapter stores or loads results)"
        if name is not None: assert name in declared, f"{chapter}/{name} is not declared in results/expected/{chapter}.json"
    for path in ROOT.glob("results/expected/*.json"):
        assert path.stem in verified.chapter_notebooks(), f"{path}: no notebook exports lmcourse.{path.stem}"
