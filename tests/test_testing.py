"The testing helpers themselves: a broken kernel must fail them."
import lmcourse  # noqa: F401
import pytest
import torch
import triton

from lmcourse.testing import (ELEMENT_TOL_FACTOR, CompileCase, KnownFailure, Launch, LaunchError, alloc_output, autotuned,
                              assert_close, capture_launches, check_against_reference, check_block, check_device,
                              check_dot, check_dtype, compile_kernel, compile_verdict, dot_tile_kernel, gpu_sm_count,
                              gpu_tiles, kernel_dtypes, launch_signature, max_rel_error, poisoned_outputs, random_tensors, rel_error,
                              tile_kwargs, tolerance, use_gpu_tiles)


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


def test_element_wise_check_catches_what_the_norm_averages_away():
    "A bf16 output whose last row was never written: 1.6% norm-wise (inside 3e-2), most of the scale element-wise."
    (y,), seed = random_tensors([(4096, 1024)], dtype=torch.float64, device="cpu")
    bad = y.bfloat16()
    bad[-1] = 0
    assert rel_error(bad, y) < tolerance(torch.bfloat16) < max_rel_error(bad, y)
    with pytest.raises(AssertionError, match=r"element-wise error .* at index \(4095, "):
        assert_close(bad, y, seed=seed)
    assert assert_close(y.bfloat16(), y) == rel_error(y.bfloat16(), y)      # the reported figure is norm-wise
    assert max_rel_error(y.bfloat16(), y) < tolerance(torch.bfloat16)        # correct rounding passes with room
    assert max_rel_error(torch.zeros(3), torch.zeros(3)) == 0 and ELEMENT_TOL_FACTOR == 4


def test_tolerance_says_which_fp32_dot_precision_applies():
    assert tolerance(torch.float32, "cuda") == 5e-3                       # tl.dot on fp32 inputs is TF32 by default
    assert tolerance(torch.float32, "cuda", input_precision="ieee") == tolerance(torch.float32, "cpu") == 2e-5
    assert tolerance(torch.float16, "cuda", input_precision="ieee") == tolerance(torch.float16, "cuda")
    with pytest.raises(ValueError, match="input_precision"):
        tolerance(torch.float32, "cuda", input_precision="tf32x3")


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


def test_launch_checks_refuse_what_a_gpu_would_reject():
    with pytest.raises(LaunchError, match="need K >= 16 for bfloat16"):
        check_dot("group_size", 4, torch.bfloat16)
    with pytest.raises(LaunchError, match="need K >= 16 for float32"):   # Triton 3.6: 16 for fp32 too
        check_dot("K", 8, torch.float32)
    with pytest.raises(LaunchError, match="need K >= 32"):
        check_dot("K", 16, torch.int8)
    with pytest.raises(LaunchError, match="power of two"):
        check_block("BLOCK_N", 96)
    with pytest.raises(LaunchError, match=r"outside this kernel's range \[16, 128\]"):
        check_block("head_dim", 256, lo=16, hi=128)
    with pytest.raises(LaunchError, match="supports float32, float16"):
        check_dtype(torch.zeros(1, dtype=torch.float64), (torch.float32, torch.float16), what="k")
    with pytest.raises(LaunchError, match="several devices"):
        check_device(torch.zeros(1), torch.zeros(1, device="meta"))
    with pytest.raises(LaunchError, match="not meta"):
        check_device(torch.zeros(1, device="meta"))
    if not torch.cuda.is_available():
        with pytest.raises(LaunchError, match="interpreter"):
            check_dtype(torch.zeros(1, dtype=torch.bfloat16))
        check_dtype(torch.zeros(1, dtype=torch.bfloat16), interpreter_bf16=True)
    check_block("BLOCK", 64, lo=16, hi=128)
    check_dot("K", 16, torch.bfloat16)
    assert issubclass(LaunchError, ValueError)


def test_kernel_dtypes_follow_the_gpu(monkeypatch):
    "bf16 only where the launchers accept it: a GPU of compute capability 8.0 or newer (a T4 is 7.5), never the interpreter."
    assert kernel_dtypes("cpu") == [torch.float32, torch.float16]
    for capability, expected in [((7, 5), [torch.float32, torch.float16]),
                                 ((9, 0), [torch.float32, torch.float16, torch.bfloat16])]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert kernel_dtypes("cuda") == expected, capability


def test_autotuned_trims_configs_and_passes_options(monkeypatch):
    "On a GPU: triton.autotune with the first LMCOURSE_AUTOTUNE_MAX configs and the caller's options; elsewhere the kernel."
    kernel = object()
    assert autotuned(["a", "b"], ["N"])(kernel) is kernel            # no GPU here: the plain kernel
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton, "autotune", lambda configs, key, **kw: (calls.append((configs, key, kw)), lambda k: k)[1])
    monkeypatch.setenv("LMCOURSE_AUTOTUNE_MAX", "1")
    autotuned(["a", "b"], ["N"], reset_to_zero=["out"])(kernel)
    assert calls == [(["a"], ["N"], {"reset_to_zero": ["out"]})]


def test_gpu_tiles_switch_launchers_to_their_gpu_choices():
    configs = [triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3), triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2)]
    assert not use_gpu_tiles("cpu") and tile_kwargs(configs, "cpu", {"BLOCK_M": 16}) == {"BLOCK_M": 16}
    with pytest.raises(ValueError, match="not a GPU"):
        gpu_sm_count("cpu")
    for index, expected in ((0, configs[0]), (1, configs[1]), (2, configs[0])):      # index modulo the list
        with gpu_tiles(index, sm_count=108):
            assert use_gpu_tiles("cpu") and gpu_sm_count("cpu") == 108
            assert tile_kwargs(configs, "cpu", {}) == {**expected.kwargs, "num_warps": expected.num_warps,
                                                       "num_stages": expected.num_stages}
    assert not use_gpu_tiles("cpu")


def test_launch_signature_is_tritons_specialisation():
    "Our specialisation of launch arguments equals Triton's own launcher's (native_specialize_impl)."
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    values = [1, 16, 17, 0, 48, 2 ** 31, 2 ** 40 + 16, -32, 1.5, True, torch.empty(4, dtype=torch.bfloat16),
              torch.empty(8, dtype=torch.float32)[1:], torch.empty(4, dtype=torch.uint8), torch.empty(4, dtype=torch.bool)]

    for value in values:
        def one(a): pass
        signature, constexprs, divisible = launch_signature(one, {"a": value})
        kind, hint = native_specialize_impl(BaseBackend, value, False, True, True)
        assert signature["a"] == kind, (value, signature, kind)
        assert ("a" in divisible) == (hint == "D"), (value, divisible, hint)
        assert ("a" in constexprs) == (kind == "constexpr")


def test_capture_records_launches_instead_of_running_them():
    from lmcourse.rmsnorm import rmsnorm
    x = torch.full((6, 40), float("nan"))
    with poisoned_outputs():
        launches = capture_launches(lambda: rmsnorm(x, torch.ones(40)))
    (launch,) = launches
    assert launch.kernel == "lmcourse.rmsnorm:_rmsnorm_fwd_kernel" and launch.constexprs["BLOCK_N"] == 64
    assert launch.signature["X"] == "*fp32" and launch.signature["N"] == "i32" and "N" not in launch.divisible
    assert launch.signature["eps"] == "fp32" and launch.num_warps == 4 and launch.config_count == 1


def test_known_failures_match_exactly():
    launch = Launch("m:_k", {"BLOCK": "constexpr"}, {"BLOCK": 128, "G": 4}, (), num_warps=8)
    failure = KnownFailure(11, "spills", "_k", {"BLOCK": 128, "num_warps": (4, 8)}, targets=("sm_90",), tritons=("3.9",))
    assert failure.matches(launch, "sm_90", "3.9.0")
    assert not failure.matches(launch, "sm_80", "3.9.0") and not failure.matches(launch, "sm_90", "3.6.0")
    assert not KnownFailure(11, "", "_k", {"BLOCK": 64}).matches(launch, "sm_90", "3.9.0")
    assert not KnownFailure(11, "", "_other").matches(launch, "sm_90", "3.9.0")


def _dot_tile(dtype, M, N, K, **options):
    signature = {"A": f"*{dtype}", "B": f"*{dtype}", "C": f"*{dtype}", "M": "constexpr", "N": "constexpr", "K": "constexpr"}
    return compile_kernel(dot_tile_kernel, signature, {"M": M, "N": N, "K": K}, **options)


def test_compile_kernel_sees_what_the_interpreter_cannot():
    "Compiled for Hopper without a GPU: a fine tile, a K = 8 dot (rejected), a tile too large for registers (spills)."
    good, small_k, spills = _dot_tile("bf16", 64, 64, 64), _dot_tile("bf16", 64, 64, 8), _dot_tile("fp32", 128, 128, 16, num_warps=1)
    case = CompileCase("demo", torch.bfloat16, lambda: None)
    launch = Launch("lmcourse.testing:dot_tile_kernel", {}, {})
    assert good.ok and good.uses_wgmma and good.spill_bytes == 0 and good.registers > 0 and good.target == "sm_90"
    assert compile_verdict(case, launch, good) == ([], None)
    assert not small_k.ok and "K >= 16" in small_k.error
    assert "does not compile" in compile_verdict(case, launch, small_k)[0][0]
    assert spills.ok and spills.spill_bytes > 0 and "spills" in compile_verdict(case, launch, spills)[0][0]
    ampere = _dot_tile("bf16", 64, 64, 64, target="sm_80")
    assert ampere.ok and ampere.mma == "mma.sync" and not compile_verdict(case, launch, ampere)[0]
