"""Tests of `lmcourse.losses`: the fused linear cross-entropy (Triton, interpreter on CPU) against the float64
reference — every reduction, several chunks and tiles in every reduced dimension, the GPU tile shapes, ignored rows,
zero weights, large logits, statistics, bad input — and the Hugging Face adapter."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch

from lmcourse.losses import (GPU_CONFIGS, IGNORE_INDEX, check_fused_ce, default_chunk_rows, forced_blocks,
                             fused_linear_cross_entropy, gpu_configs, hf_causal_lm_loss, linear_cross_entropy_ref,
                             segment_means)
from lmcourse.testing import assert_close, kernel_device, kernel_dtypes, random_tensors

DEVICE = kernel_device()

CASES = [dict(T=150, V=301, H=70, chunk_rows=64),                 # 3 chunks (ragged last), 5 vocab tiles, 3 H chunks
         dict(T=150, V=301, H=70, chunk_rows=64, reduction="mean"),
         dict(T=150, V=301, H=70, chunk_rows=64, reduction="none"),
         dict(T=77, V=129, H=97),                                 # one chunk, odd sizes
         dict(T=1, V=65, H=16),                                   # a single row
         dict(T=60, V=130, H=40, logit_scale=300.0),              # logits in the hundreds
         dict(T=60, V=130, H=40, logit_scale=300.0, reduction="none"),
         dict(T=45, V=100, H=20, ignore_every=1),                 # every row ignored
         dict(T=64, V=96, H=32, zero_scale=False, ignore_every=0)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_matches_reference(case):
    check_fused_ce(**case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE), ids=str)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_dtypes(dtype, reduction):
    check_fused_ce(97, 257, 33, dtype=dtype, reduction=reduction, chunk_rows=40)


def _gpu_blocks(dtype, i):
    return {kind: dict(gpu_configs(kind, dtype)[i % len(gpu_configs(kind, dtype))].kwargs) for kind in GPU_CONFIGS}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("i", range(3))
def test_gpu_tile_shapes_in_interpreter(dtype, i):
    "Each GPU configuration, on a problem longer than its tiles in every reduced dimension, with two chunks."
    if i >= max(len(gpu_configs(k, dtype)) for k in GPU_CONFIGS):
        pytest.skip("no such configuration")
    with forced_blocks(**_gpu_blocks(dtype, i)):
        for reduction in ("sum", "none"):
            check_fused_ce(280, 600, 200, dtype=torch.float32, reduction=reduction, chunk_rows=140)


@pytest.mark.gpu
def test_segment_losses_and_token_losses():
    (x, w), seed = random_tensors([(90, 24), (50, 24)], device=DEVICE)
    y = torch.randint(0, 50, (90,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    y[::4] = IGNORE_INDEX
    seg = torch.arange(90, device=DEVICE) // 20
    seg[80:] = -1                                                  # rows in no segment
    out = fused_linear_cross_entropy(x, w, y, segment_ids=seg, num_segments=6)
    ref = linear_cross_entropy_ref(x.double(), w.double(), y, reduction="none")
    assert_close(out.token_losses, ref, seed=seed)
    expected = torch.stack([ref[(seg == k) & (y != IGNORE_INDEX)].mean() for k in range(4)])
    assert_close(out.segment_losses[:4], expected, seed=seed)
    assert torch.isnan(out.segment_losses[4:]).all()               # segment 4 is only ignored/no-segment rows, 5 empty
    assert_close(out.loss, ref.sum(), seed=seed)


def test_segment_means_helper():
    v = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    s = torch.tensor([0, 0, 1, 1, -1])
    got = segment_means(v, s, valid=torch.tensor([True, True, True, False, True]))
    assert torch.equal(got, torch.tensor([1.5, 3.0]))


def test_no_grad_frozen_head_and_upstream_scaling():
    (x, w), seed = random_tensors([(70, 40), (90, 40)], device=DEVICE)
    y = torch.randint(0, 90, (70,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    ref = linear_cross_entropy_ref(x.double(), w.double(), y)
    with torch.no_grad():                                           # the statistics-only path
        assert_close(fused_linear_cross_entropy(x, w, y), ref, seed=seed)
    xk = x.clone().requires_grad_(True)                             # a frozen head: no dW is formed
    (3.0 * fused_linear_cross_entropy(xk, w, y, chunk_rows=32)).backward()
    xr = x.double().requires_grad_(True)
    (3.0 * linear_cross_entropy_ref(xr, w.double(), y)).backward()
    assert_close(xk.grad, xr.grad, 1e-4, seed=seed)
    wk = w.clone().requires_grad_(True)                             # retain_graph: a second backward sees the same grads
    loss = fused_linear_cross_entropy(x, wk, y)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    first = wk.grad.clone()
    wk.grad = None
    loss.backward(torch.tensor(2.0))
    assert torch.equal(first, wk.grad)


@pytest.mark.gpu
def test_leading_dims_non_contiguous_and_custom_ignore_index():
    (x, w), seed = random_tensors([(40, 3, 32), (70, 32)], device=DEVICE)
    hidden = x.transpose(0, 1)                                      # [3, 40, 32], not contiguous
    y = torch.randint(0, 70, (3, 40), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    y[:, ::3] = -1
    out = fused_linear_cross_entropy(hidden, w, y, ignore_index=-1, reduction="none")
    assert out.shape == (3, 40)
    assert_close(out, linear_cross_entropy_ref(hidden.double(), w.double(), y, ignore_index=-1, reduction="none"), seed=seed)


def test_default_chunk_rows():
    assert default_chunk_rows(8192, 128_256, 128_256 * 4096 * 2, 2) == 4096     # buffer as large as W
    assert default_chunk_rows(100, 512, 512 * 64 * 4, 4) == 100                  # small problems: one chunk
    assert default_chunk_rows(10**6, 32_000, 32_000 * 4096 * 2, 2) == 4096


def test_bad_inputs_raise_clear_errors():
    x, w = torch.randn(6, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    y = torch.randint(0, 10, (6,), device=DEVICE)
    with pytest.raises(ValueError, match="disagree"):
        fused_linear_cross_entropy(x, w[:, :5], y)
    with pytest.raises(ValueError, match=r"weight must be \[V, H\]"):
        fused_linear_cross_entropy(x, w[None], y)
    with pytest.raises(ValueError, match="targets must have shape"):
        fused_linear_cross_entropy(x, w, y[:4])
    with pytest.raises(ValueError, match="int32 or int64"):
        fused_linear_cross_entropy(x, w, y.float())
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        fused_linear_cross_entropy(x, w, y + 10)     # every id out of range (y + 5 stays in range 1 time in 64)
    with pytest.raises(ValueError, match="reduction must be"):
        fused_linear_cross_entropy(x, w, y, reduction="avg")
    with pytest.raises(ValueError, match="is a class id"):
        fused_linear_cross_entropy(x, w, y, ignore_index=3)
    with pytest.raises(ValueError, match="no gradient"):
        fused_linear_cross_entropy(x, w, y, scale=torch.ones(6, device=DEVICE, requires_grad=True))
    with pytest.raises(ValueError, match="scale must be"):
        fused_linear_cross_entropy(x, w, y, scale=torch.ones(5, device=DEVICE))
    with pytest.raises(ValueError, match="share a dtype"):
        fused_linear_cross_entropy(x.half(), w, y)
    with pytest.raises(ValueError, match="supports float32"):
        fused_linear_cross_entropy(x.double(), w.double(), y)
    with pytest.raises(ValueError, match="segment_ids"):
        fused_linear_cross_entropy(x, w, y, segment_ids=torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_cross_entropy(x, w, y, chunk_rows=0)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="interpreter"):
            fused_linear_cross_entropy(x.bfloat16(), w.bfloat16(), y)
        with pytest.raises(ValueError, match="not meta"):
            fused_linear_cross_entropy(x.to("meta"), w.to("meta"), y.to("meta"))


def test_final_hidden_takes_the_bodys_input():
    from lmcourse.model import ModelConfig, Transformer
    from lmcourse.losses import final_hidden
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=32))
    tokens = torch.randint(0, 50, (2, 11))
    other = torch.randint(0, 50, (2, 11))
    assert torch.equal(final_hidden(lm, tokens, embeddings=lm.embed_tokens(other)), final_hidden(lm, other))
    with pytest.raises(ValueError, match=r"embeddings must be \[B, T, d\]"):
        final_hidden(lm, tokens, embeddings=lm.embed_tokens(other)[:, :5])


def test_hugging_face_causal_lm_loss():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    ids = torch.randint(0, 128, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100
    expected = model(ids, labels=labels).loss
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = hf_causal_lm_loss(model, ids, labels)
    ours.backward()
    assert torch.allclose(ours, expected, atol=1e-5)
    for n, p in model.named_parameters():
        assert_close(p.grad, want[n], 1e-4, name=n)
