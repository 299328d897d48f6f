"The testing helpers themselves: a broken kernel must fail them."
import lmcourse  # noqa: F401
import pytest
import torch

from lmcourse.testing import (alloc_output, assert_close, check_against_reference, check_kernel_device, poisoned_outputs,
                              random_tensors, rel_error, tolerance)


def test_rel_error_and_poison():
    x = torch.randn(100, dtype=torch.float64)
    assert rel_error(x, x) == 0
    assert rel_error(x * 1.01, x) == pytest.approx(0.01)
    assert rel_error(torch.full_like(x, float("nan")), x) == float("inf")
    with poisoned_outputs():
        assert alloc_output((3,), torch.float16, "cpu").isnan().all()
    with poisoned_outputs(False):
        assert alloc_output((3,), torch.float32, "cpu").shape == (3,)
    assert tolerance(torch.bfloat16) > tolerance(torch.float16) > tolerance(torch.float32)
    with pytest.raises(ValueError):
        rel_error(x, x[:5])


def test_check_catches_wrong_gradient_and_unwritten_output():
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x): return x * 2

        @staticmethod
        def backward(ctx, g): return g * 3
    (x,), seed = random_tensors([(5, 6)], device="cpu")
    with pytest.raises(AssertionError, match="gradient of input 0"):
        check_against_reference(WrongGrad.apply, lambda t: t * 2, [x], seed=seed)

    def half_written(t):
        out = alloc_output(t.shape, t.dtype, t.device)
        out[:-1] = t[:-1] * 2
        return out
    with pytest.raises(AssertionError, match="seed="):
        check_against_reference(half_written, lambda t: t * 2, [x], grad=False, seed=seed)
    with pytest.raises(AssertionError, match="exceeds tolerance"):
        assert_close(x + 1, x)


def test_check_kernel_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")          # CPU tensors, also on a GPU machine
    x = torch.zeros(3)
    assert check_kernel_device("k", x, x.long(), x.bool()) == x.device
    with pytest.raises(ValueError, match="one device"):
        check_kernel_device("k", x, x.to("meta"))
    with pytest.raises(ValueError, match="k runs on CUDA .* not meta"):
        check_kernel_device("k", x.to("meta"))
    with pytest.raises(ValueError, match="bfloat16"):
        check_kernel_device("k", x, x.bfloat16())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need the Triton interpreter"):
        check_kernel_device("k", x)
