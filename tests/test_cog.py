"""Tests of `lmcourse.cog`: sign-exp math, the Triton kernels (interpreter on CPU) against the float64 reference,
the model and `transformers` adapters, and the convex-hull experiment."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import math

import pytest
import torch
import torch.nn.functional as F

from lmcourse.cog import (cog_attention, cog_attention_ref, cog_attention_simple, cog_hf_attention_fn, cogformer_attention,
                          make_attention_fn, negative_weight_fraction, padding_segment_ids, register_cog_attention, signexp,
                          train_difference_task)
from lmcourse.data import Batch
from lmcourse.model import ModelConfig, Transformer, eager_attention, patch, sdpa_attention
from lmcourse.testing import (assert_close, check_against_reference, fresh_seed, gpu_config_count, gpu_tiles,
                              exact_input_dtype, kernel_device, kernel_dtypes, random_tensors, rel_error,
                              tolerance)

DEVICE = kernel_device()


# -- the math -----------------------------------------------------------------------------------------------
def test_signexp_hand_values():
    z = math.e ** 2 + math.e + 1
    w = signexp(torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([math.e ** 2 / z, -math.e / z, 0.0], dtype=torch.float64))


def test_signexp_properties_and_masks():
    g = torch.Generator().manual_seed(fresh_seed())
    p = torch.randn(6, 13, generator=g, dtype=torch.float64) * 3
    w = signexp(p)
    assert torch.allclose(w.abs().sum(-1), torch.ones(6, dtype=torch.float64))
    assert torch.equal(torch.sign(w), torch.sign(p))
    mask = torch.rand(6, 13, generator=g) > 0.4
    mask[2] = False
    wm = signexp(p, mask)
    assert wm[~mask].abs().max() == 0 and torch.equal(wm[2], torch.zeros(13, dtype=torch.float64))
    rows = mask.any(-1)
    assert torch.allclose(wm[rows].abs().sum(-1), torch.ones(int(rows.sum()), dtype=torch.float64))
    # the softmax of |p| over the allowed entries only
    a = p.abs().masked_fill(~mask, float("-inf"))
    assert torch.allclose(wm[rows], (torch.sign(p) * torch.softmax(a, -1))[rows])


def test_backward_formula_matches_autograd():
    p = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        p[0, 3] = 0.0
        p[2] = 0.0
    dP = torch.randn(5, 11, dtype=torch.float64)
    (auto,) = torch.autograd.grad(signexp(p), p, dP)
    P = signexp(p.detach())
    D = (P * dP).sum(-1, keepdim=True)
    assert torch.allclose(P * (torch.sign(p.detach()) * dP - D), auto, atol=1e-12)
    s = torch.softmax(p.detach().abs(), -1)          # away from p = 0: dS = s∘dP − P∘D
    nz = p.detach() != 0
    assert torch.allclose((s * dP - P * D)[nz], auto[nz], atol=1e-12)


def test_reference_softmax_mode_is_eager_attention():
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    assert_close(cog_attention_ref(q, k, v, signed=False), eager_attention(q, k, v, causal=True), 1e-5)


# -- the kernel ---------------------------------------------------------------------------------------------
CASES = [
    dict(B=1, H=2, Hkv=2, Tq=45, Tk=45, D=16),
    dict(B=2, H=4, Hkv=2, Tq=37, Tk=70, D=24),                 # GQA, fewer queries (bottom-right), odd head dim
    dict(B=1, H=2, Hkv=1, Tq=50, Tk=50, D=32, causal=False),
    dict(B=1, H=2, Hkv=2, Tq=19, Tk=31, D=16, causal=False),   # fewer queries than keys, non-causal
    dict(B=1, H=2, Hkv=2, Tq=1, Tk=37, D=16),                  # one decoding step
    dict(B=2, H=2, Hkv=2, Tq=61, Tk=61, D=16, segments=True),
    dict(B=1, H=2, Hkv=1, Tq=20, Tk=61, D=16, causal=False, segments=True),
    dict(B=1, H=2, Hkv=2, Tq=40, Tk=40, D=16, zeros=True),     # exact zero logits
    dict(B=1, H=1, Hkv=1, Tq=33, Tk=33, D=128),
    dict(B=1, H=2, Hkv=2, Tq=64, Tk=64, D=16, signed=False),
    # Large logits (q, k ×8 and ×30: |q·k|·scale in the hundreds and thousands, beyond exp's fp32 range unless the
    # running max is taken over |p|, with the negative logits included) and non-default scales.
    dict(B=1, H=2, Hkv=1, Tq=70, Tk=70, D=32, qk_mult=8),
    # ×30: logits L ≈ 2000 carry an fp32 rounding error of about L·2⁻²⁴·√D ≈ 5e-4 in any fp32 kernel, the relative
    # error of the weights: the tolerance follows the conditioning, not the kernel. Every row is then one-hot to within
    # e^-20, so dQ and dK are exponentially small in exact arithmetic and fp32 cancellation (dP − D) in any kernel:
    # only the output is compared.
    dict(B=1, H=2, Hkv=2, Tq=45, Tk=45, D=16, qk_mult=30, causal=False, tol=1e-3, grad=False),
    dict(B=1, H=2, Hkv=2, Tq=50, Tk=50, D=16, qk_mult=8, signed=False),
    dict(B=1, H=2, Hkv=1, Tq=37, Tk=60, D=24, scale=0.61),
    dict(B=1, H=2, Hkv=2, Tq=40, Tk=40, D=16, qk_mult=8, scale=0.013, segments=True),
]


def _exact_inputs(dtype: torch.dtype, qk_mult: float) -> torch.dtype:
    "Large logits (×8, ×30) on a GPU run in fp16 (`exact_input_dtype`: its fp32 dots are TF32); the rest as given."
    return exact_input_dtype(dtype, DEVICE) if qk_mult > 1 else dtype


def _check(B, H, Hkv, Tq, Tk, D, causal=True, signed=True, segments=False, zeros=False, qk_mult=1.0, scale=None,
           tol=None, grad=True, dtype=torch.float32):
    dtype = _exact_inputs(dtype, qk_mult)
    (q, k, v), seed = random_tensors([(B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)], dtype, DEVICE, scale=1.5)
    q, k = q * qk_mult, k * qk_mult
    if zeros:
        q[:, :, ::5] = 0
        k[:, :, 1::7] = 0
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, 3, (B, Tk), generator=g).sort(-1).values.to(DEVICE) if segments else None
    reference = lambda q, k, v: cog_attention_ref(q, k, v, causal, scale, segment_ids=seg, signed=signed)
    grad_tol = tol                      # a case's own tolerance holds for both; otherwise gradients get 2 × the output's
    if tol is None and dtype == torch.float32:
        # Cog's signed sums cancel: on some draws any fp32 evaluation loses digits (seen: PyTorch's own fp32 reference
        # at 4.5e-5 against float64). Allow twice what that reference loses on these inputs, never less than fp32's.
        lost = rel_error(reference(q, k, v), reference(q.double(), k.double(), v.double()))
        tol = max(tolerance(dtype, DEVICE), 2 * lost)
    return check_against_reference(
        lambda q, k, v: cog_attention(q, k, v, causal, scale, signed, segment_ids=seg), reference,
        [q, k, v], grad=grad, tol=tol, grad_tol=grad_tol, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_kernel_matches_reference(case):
    _check(**case)


def _forward_backward():
    q, k, v = (torch.empty(1, 1, 64, 32, requires_grad=True) for _ in range(3))
    cog_attention(q, k, v).sum().backward()


# The GPU's tiles in the interpreter: config i of each autotune list (forward, dK/dV, dQ; BLOCK_M != BLOCK_N in most),
# on problems several blocks long in both the query and the key dimension, so that the unmasked key blocks, the
# masked diagonal blocks, the bottom-right causal offset (Tq < Tk) and the ragged last block all run at GPU sizes.
GPU_TILE_CASES = [dict(Tq=300, Tk=300, D=64),
                  dict(Tq=130, Tk=330, D=40),                                   # bottom-right causal, ragged head dim
                  dict(Tq=150, Tk=290, D=32, causal=False, segments=True)]


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(gpu_config_count(_forward_backward)))
@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_kernel_at_gpu_tiles(config, case):
    with gpu_tiles(config):
        _check(B=1, H=2, Hkv=1, **case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE), ids=str)
def test_kernel_dtypes(dtype):
    _check(B=1, H=2, Hkv=1, Tq=47, Tk=47, D=32, dtype=dtype)


@pytest.mark.gpu
def test_kernel_zero_logit_gradients_are_zero():
    (q, k, v), _ = random_tensors([(1, 1, 20, 16)] * 3, device=DEVICE)
    q[:, :, 4] = 0
    q.requires_grad_(True)
    out = cog_attention(q, k, v)
    assert out[0, 0, 4].abs().max() == 0              # every logit of row 4 is 0: all weights 0
    out.sum().backward()
    assert q.grad[0, 0, 4].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_mode_matches_sdpa(causal):
    (q, k, v), seed = random_tensors([(2, 4, 53, 32)] * 3, device=DEVICE)
    assert_close(cog_attention(q, k, v, causal, signed=False), F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                 seed=seed)


@pytest.mark.gpu
def test_non_contiguous_inputs():
    (x,), seed = random_tensors([(2, 40, 3, 16)], device=DEVICE)      # [B, T, H, D] viewed as [B, H, T, D]
    q = k = v = x.transpose(1, 2)
    assert_close(cog_attention(q, k, v), cog_attention_ref(q.double(), k.double(), v.double()), seed=seed)


def test_bad_inputs_raise_clear_errors():
    (q, k, v), _ = random_tensors([(1, 2, 40, 32)] * 3, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim=8 is not supported"):
        cog_attention(q[..., :8], k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="head_dim=256"):
        cog_attention(*(torch.randn(1, 1, 4, 256, device=DEVICE) for _ in range(3)))
    with pytest.raises(ValueError, match="differ"):
        cog_attention(q, k[:, :, :10], v)
    with pytest.raises(ValueError, match="multiple"):
        cog_attention(q, torch.randn(1, 3, 40, 32, device=DEVICE), torch.randn(1, 3, 40, 32, device=DEVICE))
    with pytest.raises(ValueError, match="supports float32"):
        cog_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="share a dtype"):
        cog_attention(q.half(), k, v)
    for causal in (True, False):
        with pytest.raises(ValueError, match="more queries"):
            cog_attention(q, k[:, :, :20], v[:, :, :20], causal)
    with pytest.raises(ValueError, match="segment_ids"):
        cog_attention(q, k, v, segment_ids=torch.zeros(1, 7, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="scale must be positive"):
        cog_attention(q, k, v, scale=-1.0)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="interpreter"):
            cog_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        with pytest.raises(ValueError, match="not meta"):
            cog_attention(q.to("meta"), k.to("meta"), v.to("meta"))


# -- the model and transformers adapters -----------------------------------------------------------------------
def test_cogformer_layout_and_kernel_inside_the_model():
    layers = cogformer_attention(5)
    assert layers[0] is sdpa_attention and layers[-1] is sdpa_attention and len(set(map(id, layers[1:-1]))) == 1
    with pytest.raises(ValueError, match="at least 3"):
        cogformer_attention(2)
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg, attention=cogformer_attention(3))
    kernel_model = Transformer(cfg, attention=cogformer_attention(3, cog=make_attention_fn(backend="triton")))
    kernel_model.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 64, (2, 33))
    segs = torch.tensor([[0] * 10 + [1] * 23, [0] * 33])
    ref, _ = model(tokens, segment_ids=segs)
    assert_close(kernel_model(tokens.to(DEVICE) if DEVICE.type == "cpu" else tokens, segment_ids=segs)[0], ref, 1e-4)
    softmax_model = Transformer(cfg)
    softmax_model.load_state_dict(model.state_dict())
    assert (softmax_model(tokens)[0] - model(tokens)[0]).abs().max() > 1e-4      # Cog really changes the middle layer
    with pytest.raises(ValueError, match="backend"):
        make_attention_fn(backend="cuda")


def test_pattern_hook_reads_and_patches_a_cog_layer():
    "make_attention_fn's `weights`: the model's hook_pattern records the signed pattern of a Cog layer and patches it."
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg, attention=cogformer_attention(3))
    with torch.no_grad():                               # larger queries so that some weights are clearly negative
        model.blocks[1].attn.q_proj.weight.mul_(20)
    tokens = torch.randint(0, 64, (2, 20))
    name = "blocks.1.attn.hook_pattern"
    logits, cache = model.run_with_cache(tokens, [name])
    assert_close(logits, model(tokens)[0], 1e-5)        # the materialised path computes the same model
    pattern = cache[name]
    assert pattern.shape == (2, 4, 20, 20) and (pattern < -1e-3).any()
    assert torch.equal(pattern.triu(1), torch.zeros_like(pattern))    # causal
    with patch(model, {name: pattern.abs()}):           # patching the signs away changes the output
        assert (model(tokens)[0] - logits).abs().max() > 1e-3


def test_negative_weight_fraction():
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=4, n_heads=4, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg, attention=cogformer_attention(4))
    with torch.no_grad():                               # larger queries/keys so logits are not all tiny
        for b in model.blocks: b.attn.q_proj.weight.mul_(20)
    tokens = torch.randint(0, 64, (2, 32))
    stats = negative_weight_fraction(model, Batch(tokens, tokens, torch.zeros_like(tokens)))
    assert [s["cog"] for s in stats] == [False, True, True, False]
    assert stats[0]["negative_fraction"] == 0 and stats[-1]["negative_fraction"] == 0
    assert all(0.2 < s["negative_fraction"] < 0.8 for s in stats[1:-1])


def test_transformers_attention_interface():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 20))

    def logits(impl, x=ids, **kw):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            return model(x, **kw).logits

    eager = logits("eager")
    assert_close(logits(register_cog_attention("cog_test_softmax", layout="softmax")), eager, 1e-4)
    cog = logits(register_cog_attention("cog_test"))
    assert (cog - eager).abs().max() > 1e-3
    assert_close(logits(register_cog_attention("cog_test_triton", backend="triton")), cog, 1e-4)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 128
    assert_close(logits("cog_test", changed)[:, :12], cog[:, :12], 1e-5)        # causal with mask=None
    padded = logits("cog_test", attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([18, 19]), 0))
    assert_close(padded[:, :18], cog[:, :18], 1e-4)
    # every-layer Cog through the kernel equals every-layer Cog through the reference
    assert_close(logits(register_cog_attention("cog_all_triton", layout="cog", backend="triton")),
                 logits(register_cog_attention("cog_all_ref", layout="cog", backend="reference")), 1e-4)


# -- the thirty-line kernel --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("T,D,block", [(1, 16, 16), (37, 32, 16), (150, 64, 64), (300, 128, 64), (129, 64, 128)])
def test_simple_kernel_matches_reference(T, D, block):
    "Ragged T, several key blocks, the GPU's block sizes, logits large enough that the running max of |p| matters."
    (q, k, v), seed = random_tensors([(2, 2, T, D)] * 3, device=DEVICE, dtype=_exact_inputs(torch.float32, 6))
    check_against_reference(lambda q, k, v: cog_attention_simple(q * 6, k, v, block),
                            lambda q, k, v: cog_attention_ref(q * 6, k, v), [q, k, v], grad=False, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE), ids=str)
def test_simple_kernel_dtypes(dtype):
    (q, k, v), seed = random_tensors([(1, 3, 70, 64)] * 3, device=DEVICE, dtype=dtype)
    check_against_reference(lambda q, k, v: cog_attention_simple(q, k, v, 32), cog_attention_ref, [q, k, v],
                            grad=False, seed=seed)


def test_simple_kernel_rejects_bad_input():
    q = torch.randn(1, 2, 8, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim=48"):
        cog_attention_simple(q, q, q)
    q = torch.randn(1, 2, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="block=8"):
        cog_attention_simple(q, q, q, block=8)
    with pytest.raises(ValueError, match="share"):
        cog_attention_simple(q, q[:, :1], q)


def test_padding_masks_become_segments():
    causal = torch.ones(5, 7, dtype=torch.bool).tril(2)                      # Tq = 5 queries at key positions 2..6
    mask = causal.expand(3, 1, 5, 7).clone()
    mask[0, ..., :2] = False                                                  # left padding: two pads
    mask[1, ..., 6] = False                                                   # right padding: the last key
    mask[1, :, 4] = causal[4] & (torch.arange(7) < 6)                         # its pad query row as transformers builds it
    seg = padding_segment_ids(mask)
    assert seg.tolist() == [[1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1], [0] * 7]
    additive = torch.zeros(3, 1, 5, 7).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(padding_segment_ids(additive), seg)
    other = mask.clone(); other[2, 0, 3, 1] = False                           # a hole no padding explains
    assert padding_segment_ids(other) is None
    assert padding_segment_ids(torch.ones(3, 1, 5, 7, dtype=torch.bool)) is None            # not causal
    assert padding_segment_ids(torch.ones(3, 1, 5, 7, dtype=torch.bool), causal=False).eq(0).all()


def test_transformers_left_padding_goes_through_the_kernel(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    import lmcourse.cog as cog_module
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(register_cog_attention("cog_test_pad", layout="cog", backend="triton"))
    ids = torch.randint(1, 128, (2, 17))
    pads = 4
    left = torch.cat([torch.zeros(2, pads, dtype=ids.dtype), ids], 1)
    mask = torch.ones_like(left); mask[0, :pads] = 0; mask[1, :pads - 1] = 0  # two lengths of padding
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    calls = []
    signexp_ref = cog_module.signexp
    monkeypatch.setattr(cog_module, "signexp", lambda *a, **k: calls.append(1) or signexp_ref(*a, **k))
    with torch.no_grad():
        padded = model(left, attention_mask=mask, position_ids=positions).logits
        alone = model(ids).logits
        alone1 = model(left[1:, pads - 1:]).logits                           # row 1: one pad less
    assert not calls, "a padding mask took the O(T²) reference path"
    assert_close(padded[0, pads:], alone[0], 1e-4)
    assert_close(padded[1, pads - 1:], alone1[0], 1e-4)


def test_transformers_arguments_the_kernel_lacks_raise():
    "dropout > 0, softcap, sliding_window and packed cu_seq_lens are refused, not silently ignored."
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.1)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(register_cog_attention("cog_test_args"))
    ids = torch.randint(0, 128, (2, 12))
    with pytest.raises(NotImplementedError, match="dropout=0.1"):
        model.train()(ids)
    model.eval()(ids)                                   # eval mode passes dropout=0.0: fine
    fn = cog_hf_attention_fn()
    module = model.model.layers[1].self_attn
    q, k, v = torch.randn(1, 4, 12, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    cu = torch.tensor([0, 5, 12])
    for kw, what in [(dict(softcap=30.0), "soft-capping"), (dict(sliding_window=4), "sliding-window"),
                     (dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7), "packed")]:
        with pytest.raises(NotImplementedError, match=what):
            fn(module, q, k, v, None, **kw)
    out, _ = fn(module, q, k, v, None, softcap=None, sliding_window=None, cu_seq_lens_q=None)   # unset: fine
    assert out.shape == (1, 12, 4, 16)


# -- the experiment ----------------------------------------------------------------------------------------
def test_convex_hull_experiment():
    _, softmax = train_difference_task(signed=False)
    _, cog = train_difference_task(signed=True)
    assert softmax.val_loss[-1] > 0.5                   # softmax cannot leave the convex hull (best ≈ 1)
    assert cog.val_loss[-1] < 0.2 * softmax.val_loss[-1], (cog.val_loss[-1], softmax.val_loss[-1])
