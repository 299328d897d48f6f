"Triton RMSNorm forward and backward against the float64 reference, in the interpreter on CPU."
import lmcourse  # noqa: F401
import pytest
import torch

from lmcourse.rmsnorm import rmsnorm, rmsnorm_ref
from lmcourse.testing import check_against_reference, kernel_device, kernel_dtypes, random_tensors

# N = 1 is left out on purpose: there y = sign(x)·w, the true gradient is O(eps), and every fp32 formula
# cancels catastrophically (1 − r²x² with r²x² ≈ 1), so a relative-error check would test rounding, not the kernel.
SHAPES = [(1, 2), (4, 7), (3, 5, 64), (17, 130), (2, 3, 257), (9, 1000)]


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(shape, dtype):
    (x, w), seed = random_tensors([shape, shape[-1:]], dtype=dtype, device=kernel_device())
    check_against_reference(rmsnorm, rmsnorm_ref, [x, w + 1.0, 1e-6], seed=seed)


def test_large_and_small_magnitudes():
    for scale in (1e-3, 1e3):
        (x, w), seed = random_tensors([(6, 48), (48,)], device=kernel_device(), scale=scale)
        check_against_reference(rmsnorm, rmsnorm_ref, [x, w, 1e-6], seed=seed)


def test_non_contiguous_input():
    x = torch.randn(8, 2, 40, device=kernel_device()).transpose(0, 1)
    w = torch.randn(40, device=kernel_device())
    torch.testing.assert_close(rmsnorm(x, w), rmsnorm_ref(x, w), rtol=1e-5, atol=1e-5)


def test_bad_input():
    x = torch.randn(4, 8, device=kernel_device())
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm(x, torch.ones(9, device=x.device))
    with pytest.raises(TypeError, match="floating-point"):
        rmsnorm(x.int(), torch.ones(8, device=x.device))
    with pytest.raises(ValueError, match="exceed"):
        rmsnorm(torch.randn(1, 70000, device=x.device), torch.ones(70000, device=x.device))
