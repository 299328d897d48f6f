"Benchmark harness: refuses CPU timings, rooflines, results store and plots."
import json

import lmcourse  # noqa: F401
import pytest
import torch

from lmcourse.bench import (bench_ms, device_spec, env_info, load_result, plot_sweep, roofline_ms, save_result,
                            speedups)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_no_cpu_timings():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        bench_ms(lambda: None)


def test_roofline():
    assert roofline_ms(0, 3e12, "NVIDIA H100 80GB HBM3") == pytest.approx(1000.0)
    assert roofline_ms(798e12, 0, "H100") == pytest.approx(1000.0)
    with pytest.raises(KeyError, match="no roofline spec"):
        device_spec("Radeon 7900")


def test_results_store_round_trip(tmp_path):
    result = {"x_name": "n", "rows": [{"n": n, "provider": p, "ms": t, "floor_ms": 0.5} for n, p, t in
                                      [(1, "a", 2.0), (1, "b", 1.0), (2, "a", 4.0), (2, "b", 1.0)]]}
    path = save_result("ch", "sweep", result, results_dir=tmp_path)
    stored = json.loads(path.read_text())
    assert set(stored["env"]) >= {"device", "torch", "triton", "git_commit", "date"}
    assert load_result("ch", "sweep", results_dir=tmp_path)["rows"] == result["rows"]
    assert load_result("ch", "missing", results_dir=tmp_path) is None
    assert [r["speedup"] for r in speedups(stored, "a") if r["provider"] == "b"] == [2.0, 4.0]
    with pytest.raises(KeyError):
        speedups(stored, "c")
    ax = plot_sweep(stored)
    assert len(ax.lines) == 3
    assert env_info()["torch"] == torch.__version__
