"Model: shapes, causality, packed documents, cache, hooks, pluggable parts, bad input."
import lmcourse  # noqa: F401
import pytest
import torch

from lmcourse.model import (KVCache, ModelConfig, NoPositions, Transformer, apply_rotary, attention_mask,
                            eager_attention, rope_frequencies, rope_pairs, sdpa_attention)


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_shapes_and_loss(n_kv_heads, layout):
    model = tiny(n_kv_heads=n_kv_heads, rope_layout=layout)
    x, y = torch.randint(0, 50, (2, 3, 17))
    logits, loss = model(x, y)
    assert logits.shape == (3, 17, 50)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.3   # near-uniform at init


@pytest.mark.parametrize("t", [1, 5, 16, 31])
def test_causality_every_position(t):
    model = tiny()
    x = torch.randint(0, 50, (2, 32))
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 7) % 50
    a, b = model(x)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-5


def test_segments_do_not_attend_across_documents():
    model = tiny()
    d1, d2, d3 = (torch.randint(0, 50, (1, n)) for n in (5, 9, 7))
    packed = torch.cat([d1, d2, d3], 1)
    seg = torch.tensor([[0] * 5 + [1] * 9 + [2] * 7])
    out = model(packed, segment_ids=seg)[0]
    for doc, sl in ((d1, slice(0, 5)), (d2, slice(5, 14)), (d3, slice(14, 21))):
        torch.testing.assert_close(out[:, sl], model(doc)[0], rtol=1e-4, atol=1e-5)


def test_attention_functions_agree_and_bottom_right_causal():
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    seg = torch.randint(0, 3, (2, 9)).sort(1).values
    for kw in (dict(causal=True), dict(causal=False), dict(causal=True, segment_ids=seg)):
        torch.testing.assert_close(sdpa_attention(q, k, v, **kw), eager_attention(q, k, v, **kw), rtol=1e-4, atol=1e-5)
    last = sdpa_attention(q[:, :, -3:], k, v)
    torch.testing.assert_close(last, eager_attention(q, k, v)[:, :, -3:], rtol=1e-4, atol=1e-5)
    mask = attention_mask(2, 4)[0, 0]
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_rope_relative_and_layouts():
    freqs = rope_frequencies(8).double()
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64).unbind(0)
    for layout in ("half", "interleaved"):
        s = lambda m, n: (apply_rotary(q, torch.tensor([m]), freqs, layout) * apply_rotary(k, torch.tensor([n]), freqs, layout)).sum()
        torch.testing.assert_close(s(2, 9), s(40, 47))
        # rotation keeps the norm of every pair
        pairs = rope_pairs(8, layout)
        r = apply_rotary(q, torch.tensor([5]), freqs, layout)[0, 0, 0]
        torch.testing.assert_close(r[pairs].norm(dim=-1), q[0, 0, 0][pairs].norm(dim=-1))
    with pytest.raises(ValueError, match="layout"):
        rope_pairs(8, "complex")


def test_generate_with_cache_matches_full_recompute():
    model = tiny()
    prompt = torch.randint(0, 50, (2, 6))
    out = model.generate(prompt, 10)
    ref = prompt
    for _ in range(10):
        ref = torch.cat([ref, model(ref)[0][:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref)


def test_custom_cache_interface_is_all_generate_uses():
    class CountingCache(KVCache):
        calls = 0

        def update(self, layer, k, v):
            CountingCache.calls += 1
            return super().update(layer, k, v)
    model = tiny()
    out = model.generate(torch.randint(0, 50, (1, 4)), 3, cache=CountingCache(2))
    assert out.shape == (1, 7) and CountingCache.calls == 2 * 3


def test_hooks_read_edit_and_remove():
    model = tiny()
    x = torch.randint(0, 50, (2, 10))
    base = model(x)[0]
    _, acts = model.run_with_cache(x)
    assert acts["blocks.1.attn.hook_z"].shape == (2, 10, 4, 8)
    assert acts["blocks.0.hook_resid_mid"].shape == (2, 10, 32)
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"] + acts["blocks.0.hook_attn_out"], acts["blocks.0.hook_resid_mid"])
    with model.hooks({"blocks.0.attn.hook_head_out": lambda h: h * torch.tensor([1.0, 0, 1, 1])[:, None]}):
        edited = model(x)[0]
    with model.hooks({"blocks.0.attn.hook_z": lambda z: z * torch.tensor([1.0, 0, 1, 1])[:, None]}):
        edited_z = model(x)[0]
    torch.testing.assert_close(edited, edited_z, rtol=1e-4, atol=1e-5)
    assert (edited - base).abs().amax() > 1e-5
    torch.testing.assert_close(model(x)[0], base)
    with pytest.raises(KeyError, match="unknown hook points"):
        with model.hooks({"blocks.9.hook_resid_pre": print}):
            pass


def test_pluggable_parts_and_aux_loss():
    class AuxFFN(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin = torch.nn.Linear(d, d)
            self.aux_loss = None

        def forward(self, x):
            self.aux_loss = torch.tensor(0.25)
            return self.lin(x)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4),
                        attention=[eager_attention, sdpa_attention], positional=NoPositions(),
                        ffn=lambda c, layer: AuxFFN(c.d_model))
    x = torch.randint(0, 50, (1, 8))
    logits, loss = model(x, x)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
    torch.testing.assert_close(loss, ce + 0.5)


def test_bad_input_messages():
    model = tiny()
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[0, 50]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), segment_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="disagree"):
        sdpa_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="not a multiple"):
        ModelConfig(n_heads=6, n_kv_heads=4, d_model=48)
    with pytest.raises(ValueError, match="entries for 2 layers"):
        Transformer(ModelConfig(n_layers=2), attention=[sdpa_attention] * 3)


def test_flops_count_active_parameters_of_conditional_ffn():
    class HalfActive(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.a, self.b = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, d, bias=False)

        def forward(self, x):
            return self.a(x)

        def active_params(self):
            return self.a.weight.numel()
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4)
    dense, sparse = Transformer(cfg), Transformer(cfg, ffn=lambda c, i: HalfActive(c.d_model))
    attn = 4 * 32 * 32 * 2 + 2 * 2 * 32      # q, k, v, o per layer and two norms per layer
    assert dense.flops_per_token(16) == 6 * (dense.num_params() + 32 * 50) + 12 * 2 * 32 * 16
    assert sparse.flops_per_token(16) == 6 * (attn + 32 + 2 * 32 * 32 + 32 * 50) + 12 * 2 * 32 * 16
