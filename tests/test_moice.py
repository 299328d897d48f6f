"""Tests of `lmcourse.moice`: waveforms and bases, the router and balance loss, the reference, the Triton kernels
(interpreter on CPU, at CPU and GPU block sizes) against float64, the sm_90 compile of every GPU configuration,
the MoICE layers in `lmcourse.model`, router-only training, the benchmark providers and the retrieval experiment.
The `transformers` integration is tested in tests/test_moice_hf.py; the GPU compile of every configuration in
tests/test_gpu_compile.py (through `lmcourse.moice.compile_cases`). Tests marked `gpu` are the kernel checks that
`make gpu` runs on a GPU in every dtype."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch

from lmcourse.data import Batch
from lmcourse.model import KVCache, ModelConfig, Transformer, apply_rotary, sdpa_attention
from lmcourse.moice import (GPU_CONFIGS, PAPER_BASES, MoICEMixer, MoICERouter, _check_moice_inputs, balance_loss,
                            choose_bases, expert_attention_ref, freeze_except_routers, kv_retrieval_task,
                            mixture_waveform, moice_attention, moice_attention_ref, moice_attention_simple,
                            moice_attention_weights, moice_decode_attention, moice_frequencies, moice_layers, moice_loss,
                            moice_retrieval_experiment, moice_run_config, moice_transformer, released_decode_step,
                            retrieval_accuracy, rotate_experts, rotated_cache, router_gates, router_param_count,
                            router_stats, separate_sdpa_decode_step, set_fixed_gates, waveform_minimum)
from lmcourse.testing import (assert_close, check_against_reference, fresh_seed, kernel_device, kernel_dtypes,
                              poisoned_outputs, random_tensors, rel_error)
from lmcourse.train import TrainConfig, train

DEVICE = kernel_device()


# -- waveforms and bases -------------------------------------------------------------------------------------
def test_waveform_minima_of_the_paper_setting():
    single, at = waveform_minimum([10_000.0], 128, 1000, 4096)
    mixed, _ = waveform_minimum(PAPER_BASES, 128, 1000, 4096)
    assert abs(single - (-1.478)) < 1e-3 and at == 4060
    assert abs(mixed - 0.153) < 1e-3 and mixed > 0 > single


def test_waveform_at_zero_and_mixture_weights():
    assert abs(mixture_waveform([0], [10_000.0, 20_000.0], 64).item() - 64 ** 0.5) < 1e-12     # f(0) = √d
    one_hot = mixture_waveform(torch.arange(50), [10_000.0, 20_000.0], 64, weights=[0.0, 1.0])
    assert torch.allclose(one_hot, mixture_waveform(torch.arange(50), [20_000.0], 64))


def test_choose_bases_starts_with_own_base_and_raises_the_minimum():
    bases = choose_bases(64, 1024, 7, own_base=10_000.0)
    assert bases[0] == 10_000.0 and len(set(bases)) == 7
    assert waveform_minimum(bases, 64, 256, 1024)[0] > waveform_minimum(PAPER_BASES, 64, 256, 1024)[0]
    assert waveform_minimum(bases[:3], 64, 256, 1024)[0] > waveform_minimum(bases[:1], 64, 256, 1024)[0]
    with pytest.raises(ValueError, match="candidates"):
        choose_bases(64, 1024, 5, candidates=[20_000.0])


# -- router, gates, balance loss ------------------------------------------------------------------------------
def test_router_param_counts_and_shared_equals_tied_per_head():
    assert router_param_count(32, 128, 7) == 58_912
    assert sum(p.numel() for p in MoICERouter(128, 7).parameters()) == 1841
    assert sum(p.numel() for p in MoICERouter(64, 7, n_heads=4).parameters()) == router_param_count(1, 64, 7, 4)
    shared, per_head = MoICERouter(32, 5), MoICERouter(32, 5, n_heads=3)
    with torch.no_grad():
        for a, b in ((per_head.w1, shared.w1), (per_head.w2, shared.w2), (per_head.w3, shared.w3)):
            a.copy_(b.expand_as(a))
    x = torch.randn(2, 3, 7, 32, dtype=torch.float64)
    assert torch.allclose(per_head.double()(x), shared.double()(x))
    with pytest.raises(ValueError, match="per-head router for 3 heads"):
        per_head.double()(torch.randn(2, 4, 7, 32, dtype=torch.float64))


def test_router_matches_its_formula():
    r = MoICERouter(16, 4).double()
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    w1, w3, w2 = r.w1[0], r.w3[0], r.w2[0]
    expected = (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    assert torch.allclose(r(x), expected)


def test_gates_keep_top_k_and_renormalise():
    z = torch.randn(300, 7, generator=torch.Generator().manual_seed(fresh_seed()))
    gates, probs = router_gates(z, 3)
    assert ((gates > 0).sum(-1) == 3).all() and torch.allclose(gates.sum(-1), torch.ones(300))
    top = probs.topk(3, -1).indices
    assert torch.equal(gates.gather(-1, top) > 0, torch.ones_like(top, dtype=torch.bool))
    assert torch.allclose(gates.gather(-1, top), probs.gather(-1, top) / probs.gather(-1, top).sum(-1, keepdim=True))
    full, p = router_gates(z, 7)
    assert torch.equal(full, p)
    with pytest.raises(ValueError, match="top_k"):
        router_gates(z, 0)


def test_balance_loss_constant_when_k_is_n_and_real_otherwise():
    z = (torch.randn(1000, 7, generator=torch.Generator().manual_seed(fresh_seed())) * 3).requires_grad_(True)
    full = balance_loss(z, 7)
    assert abs(full.item() - 7) < 1e-5
    (grad_full,) = torch.autograd.grad(full, z)
    (grad_partial,) = torch.autograd.grad(balance_loss(z, 2), z)
    assert grad_full.abs().max() < 1e-7                              # a constant: no gradient (up to rounding)
    assert grad_partial.abs().sum() > 1000 * grad_full.abs().sum()   # K < N: a real loss
    balanced = torch.eye(7).repeat(100, 1) * 30
    assert abs(balance_loss(balanced, 1).item() - 1.0) < 1e-3        # uniform routing: K


# -- the reference ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_reference_one_hot_gates_are_plain_rope_exactly(layout):
    q, k, v = (torch.randn(2, 4, 11, 16, dtype=torch.float64) for _ in range(3))
    freqs = moice_frequencies(PAPER_BASES[:3], 16)
    for j in range(3):
        gates = torch.zeros(2, 4, 11, 3, dtype=torch.float64)
        gates[..., j] = 1
        pos = torch.arange(11)
        theta = freqs[j].double()
        plain = sdpa_attention(apply_rotary(q, pos, theta, layout), apply_rotary(k, pos, theta, layout), v)
        assert torch.equal(moice_attention_ref(q, k, v, gates, freqs, layout=layout), plain)


def test_reference_equal_bases_is_plain_attention_for_any_gates():
    q, k, v = torch.randn(1, 4, 9, 16, dtype=torch.float64), torch.randn(1, 2, 13, 16, dtype=torch.float64), torch.randn(1, 2, 13, 16, dtype=torch.float64)
    freqs = moice_frequencies([10_000.0] * 3, 16)
    gates = torch.softmax(torch.randn(1, 4, 9, 3, dtype=torch.float64), -1)
    experts = expert_attention_ref(q, k, v, freqs)
    assert experts.shape == (1, 4, 3, 9, 16)
    assert torch.allclose(moice_attention_ref(q, k, v, gates, freqs), experts[:, :, 0], atol=1e-12)


def test_effective_pattern_reproduces_the_output():
    q, k, v = (torch.randn(1, 2, 10, 16, dtype=torch.float64) for _ in range(3))
    freqs = moice_frequencies(PAPER_BASES[:4], 16)
    gates = torch.softmax(torch.randn(1, 2, 10, 4, dtype=torch.float64), -1)
    w = moice_attention_weights(q, k, gates, freqs)
    assert torch.allclose(w.sum(-1), torch.ones(1, 2, 10, dtype=torch.float64), atol=1e-6)
    assert w.triu(1).abs().max() == 0
    assert torch.allclose(w @ v, moice_attention_ref(q, k, v, gates, freqs), atol=1e-6)   # weights: float32 softmax


def test_frequencies_are_rows_of_rope_frequencies():
    freqs = moice_frequencies(PAPER_BASES, 128)
    assert freqs.shape == (7, 64) and freqs.dtype == torch.float32 and torch.all(freqs[:, 0] == 1)
    with pytest.raises(ValueError, match="> 1"):
        moice_frequencies([10_000.0, 0.5], 16)
    with pytest.raises(ValueError, match="at least one"):
        moice_frequencies([], 16)


# -- the kernels ------------------------------------------------------------------------------------------
def _inputs(B, H, Hkv, Tq, Tk, D, N, dtype=torch.float32, magnitude=1.0):
    (q, k, v, z), seed = random_tensors([(B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, N)], dtype, DEVICE)
    return q * magnitude, k * magnitude, v, z, seed


def _check_prefill(B, H, Hkv, Tq, Tk, D, N=3, causal=True, layout="half", scale=None, magnitude=1.0, blocks=None,
                   dtype=torch.float32):
    q, k, v, z, seed = _inputs(B, H, Hkv, Tq, Tk, D, N, dtype, magnitude)
    freqs = moice_frequencies(PAPER_BASES[:N] if N <= 7 else [10_000.0 * (1 + 0.1 * i) for i in range(N)], D, DEVICE)
    return check_against_reference(
        lambda q, k, v, z: moice_attention(q, k, v, torch.softmax(z.float(), -1), freqs, causal, scale, layout, blocks=blocks),
        lambda q, k, v, z: moice_attention_ref(q, k, v, torch.softmax(z, -1), freqs, causal=causal, scale=scale, layout=layout),
        [q, k, v, z], seed=seed,
        # fp16: the gate-logit gradient is the softmax Jacobian (a difference of near-equal terms) of a sum of Tk·D
        # fp16 products, and it has few elements (B·H·Tq·N): its norm-wise error reaches ~1e-2 on some seeds
        grad_tol=2e-2 if dtype == torch.float16 else None)


PREFILL_CASES = [
    dict(B=1, H=2, Hkv=2, Tq=45, Tk=45, D=32),                           # several 16-blocks, ragged
    dict(B=2, H=4, Hkv=2, Tq=37, Tk=70, D=32, N=2),                      # GQA, fewer queries (bottom-right)
    dict(B=1, H=3, Hkv=1, Tq=50, Tk=50, D=48, causal=False),             # head dim not a power of 2, non-causal
    dict(B=1, H=2, Hkv=2, Tq=19, Tk=31, D=16, causal=False, layout="interleaved"),
    dict(B=1, H=2, Hkv=1, Tq=1, Tk=37, D=32),                            # one decoding step through the prefill path
    dict(B=1, H=2, Hkv=2, Tq=40, Tk=40, D=32, N=1),                      # a single expert
    dict(B=1, H=1, Hkv=1, Tq=35, Tk=35, D=32, N=7),                      # the released N
    dict(B=1, H=2, Hkv=2, Tq=33, Tk=33, D=32, magnitude=8.0),            # large logits (a max that matters)
    dict(B=1, H=2, Hkv=2, Tq=33, Tk=41, D=32, scale=0.7),                # a non-default scale
    dict(B=1, H=1, Hkv=1, Tq=34, Tk=34, D=128, N=2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_prefill_kernels_match_reference(case):
    _check_prefill(**case)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the bound is exact fp32's; a GPU's fp32 tl.dot is TF32, whose logit "
                    "rounding at |s| in the hundreds is 2¹³× coarser (the GPU tolerance is checked at ordinary magnitudes)")
@pytest.mark.parametrize("scale", [None, 0.05])
def test_prefill_large_logits_as_accurate_as_pytorch_fp32(scale):
    """q, k ×30: logits in the hundreds, a nearly one-hot softmax. dS = P ∘ (dP − D) then cancels and the gradients'
    relative error grows with the logits (their fp32 rounding is |s|·2⁻²⁴), for any fp32 implementation: the kernel
    must be as accurate as PyTorch's own fp32 computation of the same reference (within 4×), outputs and gradients."""
    q, k, v, z, seed = _inputs(1, 2, 2, 33, 33, 32, 3, magnitude=30.0)
    freqs = moice_frequencies(PAPER_BASES[:3], 32, DEVICE)
    gates = torch.softmax(z, -1)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)

    def run(fn, dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        out = fn(qq, kk, vv, gates.to(dtype))
        return [out, *torch.autograd.grad(out, [qq, kk, vv], do.to(dtype))]
    ref = run(lambda q, k, v, g: moice_attention_ref(q, k, v, g, freqs, scale=scale), torch.float64)
    torch32 = run(lambda q, k, v, g: moice_attention_ref(q, k, v, g, freqs, scale=scale), torch.float32)
    with poisoned_outputs():
        kernel = run(lambda q, k, v, g: moice_attention(q, k, v, g, freqs, True, scale), torch.float32)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), kernel, torch32, ref):
        assert rel_error(a, r) <= 4 * rel_error(b, r) + 1e-6, (name, rel_error(a, r), rel_error(b, r), seed)


GPU_BLOCKS = sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for name in ("fwd", "dk", "dv", "dq")
                     for cls in ("16bit", "fp32") for c in GPU_CONFIGS[name][cls]})


@pytest.mark.parametrize("block", GPU_BLOCKS, ids=lambda b: f"M{b[0]}N{b[1]}")
def test_prefill_kernels_at_gpu_block_sizes(block):
    BM, BN = block
    # every reduced dimension several blocks long; lengths not multiples of the blocks; Tq < Tk and GQA
    Tk = 3 * max(BM, BN) + 5
    _check_prefill(B=1, H=2, Hkv=1, Tq=Tk - 7, Tk=Tk, D=32, N=2, blocks={"BLOCK_M": BM, "BLOCK_N": BN})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE), ids=str)
def test_prefill_kernels_dtypes(dtype):
    _check_prefill(B=1, H=2, Hkv=1, Tq=39, Tk=39, D=32, dtype=dtype)


@pytest.mark.gpu
def test_prefill_output_poisoned_and_no_gradient_path_stores_no_experts():
    q, k, v, z, seed = _inputs(1, 2, 2, 20, 20, 32, 3)
    freqs = moice_frequencies(PAPER_BASES[:3], 32, DEVICE)
    with poisoned_outputs(), torch.no_grad():
        out = moice_attention(q, k, v, torch.softmax(z, -1), freqs)
    assert torch.isfinite(out).all()
    assert_close(out, moice_attention_ref(q.double(), k.double(), v.double(), torch.softmax(z.double(), -1), freqs), seed=seed)


@pytest.mark.gpu
def test_gates_receive_the_right_gradient_alone():
    q, k, v, z, seed = _inputs(1, 2, 2, 24, 24, 32, 4)
    freqs = moice_frequencies(PAPER_BASES[:4], 32, DEVICE)
    gates = torch.softmax(z, -1).requires_grad_(True)
    (dg,) = torch.autograd.grad(moice_attention(q, k, v, gates, freqs).sum(), gates)
    g64 = gates.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(moice_attention_ref(q.double(), k.double(), v.double(), g64, freqs).sum(), g64)
    assert_close(dg, ref, 4e-5, seed=seed)


@pytest.mark.gpu
def test_rotate_experts_forward_and_backward():
    (x,), seed = random_tensors([(2, 3, 29, 24)], device=DEVICE)
    freqs = moice_frequencies(PAPER_BASES[:3], 24, DEVICE)
    for layout in ("half", "interleaved"):
        def ref(x):
            pos = torch.arange(5, 34)
            return torch.stack([apply_rotary(x, pos, th.double(), layout) for th in freqs.cpu()], 2)
        check_against_reference(lambda x: rotate_experts(x, freqs, 5, layout), ref, [x], seed=seed)


@pytest.mark.gpu
def test_short_kernel_matches_reference():
    for T, block in ((77, 32), (150, 64)):
        q, k, v, z, seed = _inputs(2, 2, 2, T, T, 32, 3)
        freqs = moice_frequencies(PAPER_BASES[:3], 32, DEVICE)
        gates = torch.softmax(z, -1)
        with poisoned_outputs():
            out = moice_attention_simple(q, k, v, gates, freqs, block=block)
        assert_close(out, moice_attention_ref(q.double(), k.double(), v.double(), gates.double(), freqs), seed=seed)
    with pytest.raises(ValueError, match="power-of-2"):
        moice_attention_simple(q[..., :24], k[..., :24], v[..., :24], gates, freqs[:, :12])


DECODE_CASES = [
    dict(B=1, H=2, Hkv=2, L=77, D=32),
    dict(B=2, H=8, Hkv=2, L=100, D=32, N=7),                  # GQA group 4, the released N
    dict(B=1, H=8, Hkv=1, L=50, D=48, N=2, layout="interleaved"),
    dict(B=1, H=3, Hkv=1, L=33, D=16),                        # group 3 padded to 4
    dict(B=1, H=2, Hkv=2, L=1, D=32),                         # the first token: a cache of one
    dict(B=1, H=2, Hkv=2, L=300, D=64, N=7, num_splits=3, block_t=GPU_CONFIGS["decode"]["BLOCK_T"]),   # GPU tile
    dict(B=1, H=2, Hkv=2, L=200, D=32, num_splits=7, magnitude=8.0),
    dict(B=1, H=2, Hkv=1, L=600, D=32, N=2, num_splits=38),  # 38 chunks: the reduction's 16-chunk loop runs 3 times
    dict(B=1, H=1, Hkv=1, L=90, D=128, N=3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_decode_kernel_matches_reference(case):
    case = dict(case)
    B, H, Hkv, L, D = (case.pop(n) for n in ("B", "H", "Hkv", "L", "D"))
    N, layout, magnitude = case.pop("N", 3), case.pop("layout", "half"), case.pop("magnitude", 1.0)
    q, k, v, z, seed = _inputs(B, H, Hkv, 1, L, D, N, magnitude=magnitude)
    freqs = moice_frequencies(PAPER_BASES[:N], D, DEVICE)
    gates = torch.softmax(z, -1)
    with poisoned_outputs():
        out = moice_decode_attention(q, k, v, gates, freqs, layout=layout, **case)
    ref = moice_attention_ref(q.double(), k.double(), v.double(), gates.double(), freqs, layout=layout)
    assert_close(out, ref, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE), ids=str)
def test_decode_kernel_dtypes(dtype):
    q, k, v, z, seed = _inputs(1, 4, 2, 1, 70, 32, 3, dtype)
    freqs = moice_frequencies(PAPER_BASES[:3], 32, DEVICE)
    gates = torch.softmax(z.float(), -1)
    out = moice_decode_attention(q, k, v, gates, freqs)
    assert out.dtype == dtype
    assert_close(out, moice_attention_ref(q.double(), k.double(), v.double(), gates.double(), freqs), seed=seed)


def test_bad_inputs_raise_clear_errors():
    q, k, v, z, _ = _inputs(1, 4, 2, 1, 30, 32, 3)
    g = torch.softmax(z, -1)
    freqs = moice_frequencies(PAPER_BASES[:3], 32, DEVICE)
    cases = [
        (lambda: moice_attention(q[..., :8], k[..., :8], v[..., :8], g, freqs[:, :4]), "head_dim=8"),
        (lambda: moice_attention(q, k, v, g[..., :2], freqs), "gates must be"),
        (lambda: moice_attention(q, k, v, g, freqs[:, :7]), "freqs must be"),
        (lambda: moice_attention(q, k[:, :, :10], v, g, freqs), "differ"),
        (lambda: moice_attention(q, k[:, :1].expand(1, 3, 30, 32), v[:, :1].expand(1, 3, 30, 32), g, freqs), "multiple"),
        (lambda: moice_attention(q.expand(1, 4, 31, 32), k, v, g.expand(1, 4, 31, 3), freqs), "more queries"),
        (lambda: moice_attention(q.double(), k.double(), v.double(), g, freqs), "support float32"),
        (lambda: moice_attention(q.half(), k, v, g, freqs), "share a dtype"),
        (lambda: moice_attention(q, k, v, g, freqs, scale=-1.0), "scale must be positive"),
        (lambda: moice_attention(q, k, v, g, freqs, layout="complex"), "layout"),
        (lambda: moice_attention(q, k, v, g, moice_frequencies([1e4] * 17, 32, DEVICE)), "experts"),
        (lambda: moice_decode_attention(q.expand(1, 4, 2, 32), k, v, g.expand(1, 4, 2, 3), freqs), "one query token"),
        (lambda: moice_attention(q[:, :, :0], k, v, g[:, :, :0], freqs), "empty"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="interpreter"):
            moice_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, freqs)
        with pytest.raises(ValueError, match="not meta"):
            moice_attention(q.to("meta"), k.to("meta"), v.to("meta"), g.to("meta"), freqs.to("meta"))
    with pytest.raises(TypeError, match="gates must be a tensor"):
        moice_attention(q, k, v, [0.5, 0.5], freqs)


def test_prefill_refuses_sizes_past_its_32bit_offsets_and_decode_does_not():
    # stride-0 views through the launchers' input check only: were the check missing, moice_attention would go on
    # to allocate the 15 GB rotated copies
    B, H, T, D = 4, 32, 32_768, 128
    x = torch.zeros((), device=DEVICE).expand(B, H, T, D)
    freqs = moice_frequencies(PAPER_BASES, D, DEVICE)
    gates = torch.zeros((), device=DEVICE).expand(B, H, T, 7)                    # 4·32·7·32k·128 = 3.8e9 ≥ 2³¹
    with pytest.raises(ValueError, match="overflow 32-bit offsets"):
        _check_moice_inputs(x, x, x, gates, freqs, 0.1, "half")
    _check_moice_inputs(x, x, x, gates[..., :3], freqs[:3], 0.1, "half")           # 3 experts: 1.6e9, they fit
    _check_moice_inputs(x[:, :, -1:], x, x, gates[:, :, -1:], freqs, 0.1, "half", decode=True)   # 64-bit: no limit


# -- the model ------------------------------------------------------------------------------------------------
CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)


def _plain_and_moice(bases=PAPER_BASES[:3], **kw):
    torch.manual_seed(0)
    plain = Transformer(CFG)
    return plain, moice_transformer(CFG, bases, base=plain, **kw)


def test_one_hot_gates_reproduce_the_plain_model_bitwise():
    plain, moice = _plain_and_moice()
    set_fixed_gates(moice, torch.tensor([1.0, 0.0, 0.0]))
    tokens = torch.randint(0, 64, (3, 45))
    with torch.no_grad():
        assert torch.equal(moice(tokens)[0], plain(tokens)[0])
    assert torch.equal(moice.generate(tokens[:, :9], 20), plain.generate(tokens[:, :9], 20))
    set_fixed_gates(moice, torch.tensor([0.0, 1.0, 0.0]))
    with torch.no_grad():
        assert (moice(tokens)[0] - plain(tokens)[0]).abs().max() > 1e-5     # another base is another model


def test_cache_keeps_unrotated_keys_once():
    _, moice = _plain_and_moice()
    cache = KVCache(CFG.n_layers)
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        moice(tokens, cache=cache)
        k_pre = moice.blocks[0].attn.project(moice.blocks[0].attn_norm(moice.embed(tokens)))[1]
    assert cache.keys[0].shape == (2, CFG.n_kv_heads, 10, CFG.head_dim)       # one copy, whatever N is
    assert torch.equal(cache.keys[0], k_pre)


def test_kernel_backend_inside_the_model_matches_reference_forward_and_backward():
    _, moice = _plain_and_moice()
    kernel = moice_transformer(CFG, PAPER_BASES[:3], backend="triton")
    kernel.load_state_dict(moice.state_dict())
    tokens = torch.randint(0, 64, (2, 33))
    ref_loss = moice(tokens, tokens)[1]
    ref_loss.backward()
    loss = kernel(tokens.to(DEVICE), tokens.to(DEVICE))[1]
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-4
    for (name, p), (_, pk) in zip(moice.named_parameters(), kernel.named_parameters()):
        assert_close(pk.grad.cpu(), p.grad, 1e-3, name=name)
    with torch.no_grad():                                                     # the decode path inside generate
        assert torch.equal(kernel.generate(tokens[:, :5].to(DEVICE), 6).cpu(), moice.generate(tokens[:, :5], 6))


def test_per_head_router_and_hook_pattern():
    _, moice = _plain_and_moice(router="per_head")
    assert moice.blocks[0].attn.moice.router.w1.shape == (CFG.n_heads, 3, CFG.head_dim)
    tokens = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        logits = moice(tokens)[0]
        seen = {}
        with moice.hooks({"blocks.1.attn.hook_pattern": lambda w: seen.setdefault("w", w)}):
            hooked = moice(tokens)[0]
    assert_close(hooked, logits, 1e-5)
    assert seen["w"].shape == (2, CFG.n_heads, 20, 20)
    assert torch.allclose(seen["w"].sum(-1), torch.ones(2, CFG.n_heads, 20))


def test_positions_other_than_cache_indices_are_refused():
    _, moice = _plain_and_moice()
    tokens = torch.randint(0, 64, (1, 12))
    with pytest.raises(ValueError, match="default positions"):
        moice(tokens, positions=torch.arange(12) + 3)
    with pytest.raises(ValueError, match="default positions"):
        moice(tokens, positions=torch.arange(12)[None])
    with pytest.raises(ValueError, match="rope_base"):
        moice_transformer(CFG, [20_000.0, 10_000.0], base=Transformer(CFG))
    with pytest.raises(ValueError, match="segment ids"):
        moice_transformer(CFG, PAPER_BASES[:2], backend="triton")(tokens.to(DEVICE), segment_ids=torch.zeros_like(tokens).to(DEVICE))


def _random_batches(batch, length):
    def get_batch(split, g):
        x = torch.randint(0, 64, (batch, length + 1), generator=g)
        return Batch(x[:, :-1], x[:, 1:])
    return get_batch


@pytest.mark.parametrize("top_k", [None, 2])
def test_router_only_training_invariants(top_k):
    _, moice = _plain_and_moice(top_k=top_k)
    trainable = freeze_except_routers(moice)
    assert sum(p.numel() for p in trainable) == router_param_count(CFG.n_layers, CFG.head_dim, 3)
    before = {n: t.clone() for n, t in moice.state_dict().items()}
    loss, metrics = moice_loss()(moice, _random_batches(4, 32)("train", torch.Generator().manual_seed(0)))
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in trainable)                     # lower layers' routers get gradients
    moice.zero_grad()
    tcfg = TrainConfig(steps=20, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=20, eval_batches=1,
                       progress=False)
    history = train(moice, _random_batches(4, 32), tcfg, loss_fn=moice_loss(), device="cpu")
    after = moice.state_dict()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(".router." in n for n in changed), changed
    aux = torch.tensor(history.metrics["balance_loss"])
    if top_k is None:
        assert torch.allclose(aux, torch.full_like(aux, 3.0), atol=1e-5)
    else:
        assert aux.min() >= 2.0 - 1e-4 and aux.std() > 0                     # K = 2: a real, varying loss


def test_moice_layers_and_fixed_gate_errors():
    _, moice = _plain_and_moice()
    mixers = moice_layers(moice)
    assert len(mixers) == CFG.n_layers and all(isinstance(m, MoICEMixer) for m in mixers)
    mixers[0].fixed_gates = torch.ones(2)
    with pytest.raises(ValueError, match="fixed_gates"):
        moice(torch.randint(0, 64, (1, 5)))
    with pytest.raises(ValueError, match="router"):
        MoICEMixer(16, 4, PAPER_BASES, router="global")
    with pytest.raises(ValueError, match="top_k"):
        MoICEMixer(16, 4, PAPER_BASES[:3], top_k=4)


# -- benchmark providers compute the same output ---------------------------------------------------------------
def test_benchmark_decode_providers_agree_with_the_reference():
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    freqs = moice_frequencies(PAPER_BASES[:3], 32)
    gates = torch.softmax(torch.randn(1, 4, 1, 3), -1)
    ref = moice_attention_ref(q.double(), k.double(), v.double(), gates.double(), freqs)
    assert_close(released_decode_step(q, k, v, gates, freqs), ref, 1e-5)
    assert_close(separate_sdpa_decode_step(q, rotated_cache(k, freqs), v, gates, freqs), ref, 1e-5)


# -- the retrieval experiment ---------------------------------------------------------------------------------
def test_kv_retrieval_documents_are_answerable_from_the_document():
    batch = kv_retrieval_task(16, seed=fresh_seed() % 1000, length=80, n_queries=3, n_symbols=8)
    n_pairs = batch.info["n_pairs"]
    seqs = torch.cat([batch.inputs, batch.targets[:, -1:]], 1)
    assert seqs.shape[1] == 1 + 5 * (n_pairs + 3) and seqs.max() < 3 + 16
    records = seqs[:, 1:1 + 5 * n_pairs].view(16, n_pairs, 5)
    questions = seqs[:, 1 + 5 * n_pairs:].view(16, 3, 5)
    for i in range(16):
        keys = {tuple(r[1:3].tolist()): tuple(r[3:].tolist()) for r in records[i]}
        assert len(keys) == n_pairs                                             # distinct keys
        for q, g in zip(questions[i], batch.info["gold"][i]):
            assert keys[tuple(q[1:3].tolist())] == tuple(q[3:].tolist())        # an oracle reading the document: 100%
            assert torch.equal(records[i, g, 1:3], q[1:3])
    assert (batch.targets != -100).sum() == 16 * 3 * 2
    with pytest.raises(ValueError, match="fewer than"):
        kv_retrieval_task(1, length=20, n_queries=8)


def test_retrieval_accuracy_of_an_oracle_and_of_a_random_model():
    batch = kv_retrieval_task(8, seed=0, length=64, n_queries=2, n_symbols=8)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, inputs):
            logits = torch.zeros(*inputs.shape, 19)
            answer = batch.targets.clamp(min=0)
            return logits.scatter(-1, answer[..., None], 1.0), None

    result = retrieval_accuracy(Oracle(), batch, n_bins=4)
    assert result["accuracy"] == 1.0 and sum(result["count"]) == 16
    torch.manual_seed(0)
    random_model = Transformer(ModelConfig(vocab_size=19, d_model=32, n_layers=1, n_heads=2, max_seq_len=128))
    assert retrieval_accuracy(random_model, batch)["accuracy"] < 0.2


def test_retrieval_experiment_smoke_pipeline(monkeypatch):
    monkeypatch.setenv("LMCOURSE_PROFILE", "smoke")
    cfg = moice_run_config()
    result = moice_retrieval_experiment(cfg)
    arms = [r["arm"] for r in result["runs"]]
    assert arms[:2] == ["baseline", "attention buckets"] and len(arms) == 2 + len(cfg.variants) * len(cfg.router_seeds)
    assert result["bases"][0] == cfg.model.rope_base and len(result["bases"]) == cfg.n_experts
    for run in result["runs"]:
        for length in (cfg.train_len, cfg.eval_len):
            r = run[f"len{length}"]
            assert 0 <= r["accuracy"] <= 1 and len(r["by_position"]) == cfg.n_bins
    moice_runs = [r for r in result["runs"] if r["arm"].startswith("MoICE")]
    assert all(len(r["router"]["entropy"]) == cfg.model.n_layers for r in moice_runs)
    assert result["runs"][1]["router"]["entropy"] == []                      # fixed gates: no router


def test_router_stats_of_uniform_router():
    _, moice = _plain_and_moice()
    for mixer in moice_layers(moice):
        with torch.no_grad():
            mixer.router.w2.zero_()                                             # z = 0: uniform gates
    stats = router_stats(moice, torch.randint(0, 64, (2, 16)))
    assert all(abs(e - torch.log(torch.tensor(3.0)).item()) < 1e-5 for e in stats["entropy"])
    assert torch.allclose(torch.tensor(stats["usage"]), torch.full((2, 3), 1 / 3))
