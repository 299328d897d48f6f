"Triton RMSNorm forward and backward against the float64 reference: the interpreter's and the GPU's launch choices."
import lmcourse  # noqa: F401
import pytest
import torch

from lmcourse.rmsnorm import MAX_FUSED_N, _num_warps, compile_cases, rmsnorm, rmsnorm_ref
from lmcourse.testing import (LaunchError, capture_launches, check_against_reference, gpu_tiles, kernel_device,
                              kernel_dtypes, random_tensors)

# N = 1 is left out on purpose: there y = sign(x)·w, the true gradient is O(eps), and every fp32 formula
# cancels catastrophically (1 − r²x² with r²x² ≈ 1), so a relative-error check would test rounding, not the kernel.
SHAPES = [(1, 2), (4, 7), (3, 5, 64), (17, 130), (2, 3, 257), (9, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(shape, dtype):
    (x, w), seed = random_tensors([shape, shape[-1:]], dtype=dtype, device=kernel_device())
    check_against_reference(rmsnorm, rmsnorm_ref, [x, w + 1.0, 1e-6], seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(300, 96), (1000, 33), (5, MAX_FUSED_N)])
def test_at_gpu_launch_choices(shape):
    """The GPU's launch: 264 backward programs (2 per SM of an H100), so 300 rows give 2 rows to each of the first
    150 programs and none to the rest; 1000 rows give 4 rows a program (a loop that overwrites the dw partial sums
    instead of accumulating fails); and the widest row the kernel takes."""
    with gpu_tiles():
        (x, w), seed = random_tensors([shape, shape[-1:]], device=kernel_device())
        check_against_reference(rmsnorm, rmsnorm_ref, [x, w + 1.0, 1e-6], seed=seed)


def test_gpu_launch_choices_are_what_a_gpu_runs():
    "Warps by block size and 264 backward programs, read from the launches themselves."
    x = torch.empty(1000, 4096, requires_grad=True)
    w = torch.empty(4096, requires_grad=True)
    fwd, bwd = capture_launches(lambda: rmsnorm(x, w).backward(torch.empty(1000, 4096)))
    assert (fwd.name, bwd.name) == ("_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel")
    assert fwd.num_warps == bwd.num_warps == 8 and fwd.constexprs["BLOCK_N"] == 4096
    assert "rows_per_program" in bwd.signature and bwd.signature["rows_per_program"] == "i32"   # cdiv(1000, 264) = 4
    assert [_num_warps(n) for n in (1024, 2048, 4096, 8192)] == [4, 8, 8, 16]
    assert {case.label for case in compile_cases()} == {"N=1000", "N=4096", f"N={MAX_FUSED_N}"}


@pytest.mark.gpu
def test_large_and_small_magnitudes():
    for scale in (1e-3, 1e3):
        (x, w), seed = random_tensors([(6, 48), (48,)], device=kernel_device(), scale=scale)
        check_against_reference(rmsnorm, rmsnorm_ref, [x, w, 1e-6], seed=seed)


@pytest.mark.gpu
def test_non_contiguous_input():
    x = torch.randn(8, 2, 40, device=kernel_device()).transpose(0, 1)
    w = torch.randn(40, device=kernel_device())
    torch.testing.assert_close(rmsnorm(x, w), rmsnorm_ref(x, w), rtol=1e-5, atol=1e-5)


def test_bf16_in_the_interpreter_is_exact_enough():
    "The kernels only load and store bf16 (arithmetic in fp32), so the interpreter handles bf16 for RMSNorm."
    (x, w), seed = random_tensors([(5, 300), (300,)], dtype=torch.bfloat16, device=kernel_device())
    check_against_reference(rmsnorm, rmsnorm_ref, [x, w + 1.0, 1e-6], seed=seed)


def test_bad_input():
    x = torch.randn(4, 8, device=kernel_device())
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm(x, torch.ones(9, device=x.device))
    with pytest.raises(TypeError, match="floating-point"):
        rmsnorm(x.int(), torch.ones(8, device=x.device))
    with pytest.raises(LaunchError, match="supports float32"):
        rmsnorm(x.double(), torch.ones(8, device=x.device, dtype=torch.float64))
    with pytest.raises(LaunchError, match="exceed the fused kernel's limit of 8192"):
        rmsnorm(torch.randn(1, MAX_FUSED_N + 1, device=x.device), torch.ones(MAX_FUSED_N + 1, device=x.device))
    with pytest.raises(LaunchError, match="not meta"):
        rmsnorm(x.to("meta"), torch.ones(8, device="meta"))
