"Benchmark harness: refuses CPU kernel timings, device ceilings (nominal and measured), rooflines, MFU, sweeps, results store and plots."
import json

import lmcourse  # noqa: F401
import pytest
import torch

from lmcourse.bench import (DEVICE_SPECS, bench_ms, cpu_time_ms, device_spec, env_info, load_result, mfu, plot_sweep,
                            roofline_ms, run_sweep, save_result, speedups)
from lmcourse.train import History


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_no_cpu_timings():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        bench_ms(lambda: None)


def test_device_specs_are_matched_exactly_and_hold_both_ceilings():
    h200 = device_spec("NVIDIA H200")
    assert (h200.nominal_bf16_tflops, h200.nominal_hbm_tbps, h200.bf16_tflops, h200.hbm_tbps) == (989.0, 4.8, 790.0, 4.3)
    h100 = device_spec("NVIDIA H100 80GB HBM3")
    assert (h100.nominal_bf16_tflops, h100.bf16_tflops, h100.hbm_tbps) == (989.0, 798.0, 3.0) and h100.measured
    assert device_spec("NVIDIA H100 PCIe").nominal_bf16_tflops == 756.0
    assert device_spec("NVIDIA H100 NVL").nominal_hbm_tbps == 3.9
    gh200 = device_spec("NVIDIA GH200 480GB")                   # contains "H200" but is not one
    assert gh200.nominal_hbm_tbps == 4.0 and not gh200.measured and gh200.hbm_tbps == 4.0   # datasheet fallback
    assert {device_spec(n).nominal_bf16_tflops for n in ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB")} == {312.0}
    for name in ("H100", "NVIDIA H200 NVL", "Radeon 7900", "cpu"):
        with pytest.raises(KeyError, match="no DeviceSpec"):
            device_spec(name)
    for name, spec in DEVICE_SPECS.items():
        assert spec.name == name and spec.source
        assert spec.bf16_tflops <= spec.nominal_bf16_tflops and spec.hbm_tbps <= spec.nominal_hbm_tbps
        assert spec.measured == ("Measured on" in spec.source)     # the source says which figures are measured


def test_roofline_uses_measured_ceilings_and_mfu_the_nominal_peak():
    assert roofline_ms(0, 3e12, "NVIDIA H100 80GB HBM3") == pytest.approx(1000.0)
    assert roofline_ms(798e12, 0, "NVIDIA H100 80GB HBM3") == pytest.approx(1000.0)
    assert roofline_ms(790e12, 4.3e12, "NVIDIA H200") == pytest.approx(1000.0)
    assert roofline_ms(1e12, 4.3e12, "NVIDIA H200") == pytest.approx(1000.0)   # the larger of the two floors
    assert mfu(1e6, 989e6, "NVIDIA H200") == pytest.approx(1.0)
    assert mfu(1e6, 312e6, "NVIDIA A100-SXM4-80GB") == pytest.approx(1.0)
    # a history's MFU: per-device throughput (not the total of 8 ranks) against the nominal peak of its device
    hist = History(device="NVIDIA H200", world_size=8, tokens_per_s=8e6, tokens_per_s_per_device=1e6, flops_per_token=494.5e6)
    assert hist.mfu() == pytest.approx(0.5)
    with pytest.raises(KeyError, match="no DeviceSpec"):
        History(device="NVIDIA B200", tokens_per_s_per_device=1.0, flops_per_token=1.0).mfu()


def test_cpu_sweep_rows():
    "run_sweep's row logic, exercised on the CPU with the CPU timer (no floor: a CPU has no DeviceSpec)."
    x, ys = torch.randn(64, 64, requires_grad=True), []
    def backward(n):
        ys.append(torch.randn(n, 64, requires_grad=True))
        y = ys[-1]
        return (lambda: (y @ x).sum().backward()), [x, y]
    def matmul(n):
        a = torch.randn(n, 64)
        return lambda: a @ x.detach()
    providers = {"matmul": matmul, "backward": backward, "skipped": lambda n: None}
    result = run_sweep(providers, [32, 128], flops=lambda n: 2 * n * 64 * 64, bytes_moved=lambda n: 4 * n * 64 * 2,
                       x_name="n", timer=lambda fn, grad_to_none=None: cpu_time_ms(fn, grad_to_none=grad_to_none, min_run_time=0.01))
    assert [(r["n"], r["provider"]) for r in result["rows"]] == [(32, "matmul"), (32, "backward"), (128, "matmul"), (128, "backward")]
    for r in result["rows"]:
        assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"] and r["floor_ms"] is None
        assert r["tflops"] == pytest.approx(2 * r["n"] * 64 * 64 / (r["ms"] * 1e-3) / 1e12)
    torch.testing.assert_close(x.grad, ys[-1].detach().T @ torch.ones(128, 64))   # one call's gradient: reset between repetitions
    assert run_sweep({"m": providers["matmul"]}, [8], timer=cpu_time_ms)["timer"] == "cpu_time_ms"


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
    assert "CPU measurement" in plot_sweep({**stored, "timer": "cpu_time_ms"}).get_title()
    assert env_info()["torch"] == torch.__version__
