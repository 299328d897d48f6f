"""Model: shapes, causality, packed documents, cache, the attention paths (SDPA, FlexAttention, block masks) against
`eager_attention`, per-layer factories, the embed/body/head split, hook points and activation patching, bad input."""
import lmcourse  # noqa: F401
import pytest
import torch
import torch.nn as nn
from torch.nn.attention.flex_attention import create_block_mask

import lmcourse.model as M
from lmcourse.model import (Attention, Block, KVCache, ModelConfig, NoPositions, RotaryEmbedding, Transformer,
                            apply_rotary, attention_mask, attention_weights, block_tiles, document_block_mask,
                            eager_attention, expand_kv, flex_document_attention, hook_points, patch, rope_frequencies,
                            rope_pairs, sdpa_attention)
from lmcourse.testing import assert_close, fresh_seed


@pytest.fixture
def seed():
    "A fresh seed for torch's global generator, printed so that a failure can be replayed."
    s = fresh_seed()
    print(f"seed={s}")
    torch.manual_seed(s)
    return s


def tiny(**kw):
    cfg = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


def random_segments(B, T, n_docs, sort=True):
    ids = torch.randint(0, n_docs, (B, T))
    return ids.sort(1).values if sort else ids


# -- the model ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_shapes_and_loss(seed, n_kv_heads, layout):
    model = tiny(n_kv_heads=n_kv_heads, rope_layout=layout)
    x, y = torch.randint(0, 50, (2, 3, 17))
    logits, loss = model(x, y)
    assert logits.shape == (3, 17, 50)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.3   # near-uniform at init


@pytest.mark.parametrize("t", [1, 5, 16, 31])
def test_causality_every_position(seed, t):
    model = tiny()
    x = torch.randint(0, 50, (2, 32))
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 7) % 50
    a, b = model(x)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-5


def test_segments_do_not_attend_across_documents(seed):
    model = tiny()
    d1, d2, d3 = (torch.randint(0, 50, (1, n)) for n in (5, 9, 7))
    packed = torch.cat([d1, d2, d3], 1)
    seg = torch.tensor([[0] * 5 + [1] * 9 + [2] * 7])
    out = model(packed, segment_ids=seg)[0]
    for doc, sl in ((d1, slice(0, 5)), (d2, slice(5, 14)), (d3, slice(14, 21))):
        torch.testing.assert_close(out[:, sl], model(doc)[0], rtol=1e-4, atol=1e-5)


def test_rope_relative_and_layouts(seed):
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


def test_generate_with_cache_matches_full_recompute(seed):
    model = tiny()
    prompt = torch.randint(0, 50, (2, 6))
    out = model.generate(prompt, 10)
    ref = prompt
    for _ in range(10):
        ref = torch.cat([ref, model(ref)[0][:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref)


def test_custom_cache_interface_is_all_generate_uses(seed):
    class CountingCache(KVCache):
        calls = 0

        def update(self, layer, k, v):
            CountingCache.calls += 1
            return super().update(layer, k, v)
    model = tiny()
    out = model.generate(torch.randint(0, 50, (1, 4)), 3, cache=CountingCache(2))
    assert out.shape == (1, 7) and CountingCache.calls == 2 * 3


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


# -- attention paths against eager_attention ----------------------------------------------------------------
ATTENTION_CASES = [  # (n_kv_heads, Tq, causal, segments, scale); Tk = 37 keys, H = 4 query heads
    (4, 37, True, None, None), (2, 37, False, None, 0.3), (1, 1, True, None, None), (2, 9, True, None, None),
    (2, 37, True, "sorted", None), (1, 37, True, "unsorted", 0.3), (4, 37, False, "sorted", None),
    (2, 9, True, "sorted", 0.3), (2, 1, True, "sorted", None), (2, 9, False, "unsorted", None),
]


def attention_inputs(n_kv, tq, segments, tk=37, B=2, D=16):
    q, k, v = torch.randn(B, 4, tq, D), torch.randn(B, n_kv, tk, D), torch.randn(B, n_kv, tk, D)
    seg = None if segments is None else random_segments(B, tk, 4, sort=segments == "sorted")
    return q, k, v, seg


@pytest.mark.gpu
@pytest.mark.parametrize("n_kv,tq,causal,segments,scale", ATTENTION_CASES)
def test_every_attention_path_equals_eager(seed, monkeypatch, n_kv, tq, causal, segments, scale):
    q, k, v, seg = attention_inputs(n_kv, tq, segments)
    kw = dict(causal=causal, segment_ids=seg, scale=scale)
    ref = eager_attention(q.double(), k.double(), v.double(), **kw).float()
    assert_close(eager_attention(q, k, v, **kw), ref, 1e-6, "eager", seed)
    assert_close(sdpa_attention(q, k, v, **kw), ref, 1e-5, "sdpa (CPU dispatch)", seed)
    for block_size in (8, 16, 128):        # several tiles in both directions, ragged last tiles, and one tile
        assert_close(flex_document_attention(q, k, v, block_size=block_size, **kw), ref, 1e-5, f"flex {block_size}", seed)
    bm = document_block_mask(seg, tq, k.shape[2], causal=causal, block_size=8)
    assert_close(sdpa_attention(q, k, v, block_mask=bm, **kw), ref, 1e-5, "sdpa with a block mask", seed)
    calls = []
    def counting_flex(*args, **kwargs):
        calls.append(1)
        return flex_document_attention(*args, **kwargs)
    monkeypatch.setattr(M, "flex_serves", lambda device: True)      # the CUDA dispatch, run on CPU
    monkeypatch.setattr(M, "flex_document_attention", counting_flex)
    assert_close(sdpa_attention(q, k, v, **kw), ref, 1e-5, "sdpa (CUDA dispatch)", seed)
    assert len(calls) == M.needs_mask(tq, k.shape[2], causal=causal, segment_ids=seg)


def effective_mask(bm, B, tq, tk):
    "What a FlexAttention kernel applies: full tiles wholly, partial tiles through mask_mod, skipped tiles not at all."
    tiles = block_tiles(bm).expand(B, -1, -1, -1)[:, 0]                     # [B, n_q, n_k]
    bq, bk = bm.BLOCK_SIZE
    tiles = tiles.repeat_interleave(bq, 1).repeat_interleave(bk, 2)[:, :tq, :tk]
    b, i, j = torch.arange(B)[:, None, None], torch.arange(tq)[None, :, None], torch.arange(tk)[None, None, :]
    pairs = bm.mask_mod(b, torch.zeros((), dtype=torch.long), i, j).expand(B, tq, tk)
    return (tiles == 2) | ((tiles == 1) & pairs)


@pytest.mark.gpu
@pytest.mark.parametrize("tq,tk,causal", [(40, 40, True), (40, 40, False), (13, 40, True), (1, 40, True), (64, 64, True)])
@pytest.mark.parametrize("sort", [True, False])
def test_block_mask_tiles_are_exact(seed, tq, tk, causal, sort):
    B = 3
    seg = random_segments(B, tk, 5, sort=sort)
    for segment_ids in (None, seg):
        for block_size in (4, 8, 128):
            bm = document_block_mask(segment_ids, tq, tk, causal=causal, block_size=block_size)
            want = attention_mask(tq, tk, causal=causal, segment_ids=segment_ids)
            want = torch.ones(1, tq, tk, dtype=torch.bool) if want is None else want[:, 0]
            got = effective_mask(bm, B, tq, tk)
            assert torch.equal(got, want.expand_as(got)), f"block_size={block_size}, seed={seed}"
            if sort:   # sorted ids: the same tiles as evaluating the mask at every pair
                ids = segment_ids if segment_ids is not None else torch.zeros(1, tk, dtype=torch.long)
                off = tk - tq
                exact = create_block_mask(lambda b, h, i, j: ((j <= i + off) | (not causal)) & (ids[b, i + off] == ids[b, j]),
                                          ids.shape[0], None, tq, tk, device="cpu", BLOCK_SIZE=block_size)
                assert torch.equal(block_tiles(bm), block_tiles(exact)), f"block_size={block_size}, seed={seed}"


def test_block_mask_skips_work_across_documents():
    seg = torch.tensor([[0] * 256 + [1] * 256])
    tiles = block_tiles(document_block_mask(seg, 512, 512))[0, 0]
    assert tiles.tolist() == [[1, 0, 0, 0], [2, 1, 0, 0], [0, 0, 1, 0], [0, 0, 2, 1]]


def test_compiled_model_with_packed_documents_is_one_graph(seed, monkeypatch):
    "The CUDA dispatch under torch.compile(model): mask built in the graph, no graph break, no recompile for new ids."
    model = tiny()
    x = torch.randint(0, 50, (2, 21))
    with torch.no_grad():
        batches = [(seg, model(x, segment_ids=seg)[0]) for seg in (random_segments(2, 21, 3) for _ in range(2))]
        monkeypatch.setattr(M, "flex_serves", lambda device: True)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        for i, (seg, expected) in enumerate(batches):
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                assert_close(compiled(x, segment_ids=seg)[0], expected, 1e-5, "compiled model", seed)


def test_block_mask_must_fit():
    q, k, v, seg = attention_inputs(2, 9, "sorted")
    with pytest.raises(ValueError, match="block_mask was built for"):
        flex_document_attention(q, k, v, segment_ids=seg, block_mask=document_block_mask(seg[:, :9], 9, 9))
    with pytest.raises(ValueError, match="more queries"):
        document_block_mask(None, 5, 4)


def test_body_builds_one_block_mask_for_all_layers(seed, monkeypatch):
    model = tiny(n_layers=3)
    x = torch.randint(0, 50, (2, 21))
    seg = random_segments(2, 21, 3)
    with torch.no_grad():
        cpu_logits = model(x, segment_ids=seg)[0]
        built, received = [], []
        def counting_mask(*args, **kwargs):
            built.append(document_block_mask(*args, **kwargs))
            return built[-1]
        def recording_attention(q, k, v, *, causal=True, segment_ids=None, scale=None, block_mask=None):
            received.append(block_mask)
            return sdpa_attention(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale, block_mask=block_mask)
        monkeypatch.setattr(M, "flex_serves", lambda device: True)
        monkeypatch.setattr(M, "document_block_mask", counting_mask)
        flex_logits = model(x, segment_ids=seg)[0]
        assert_close(flex_logits, cpu_logits, 1e-5, "logits through FlexAttention", seed)
        recording = Transformer(model.cfg, attention=recording_attention).eval()
        recording.load_state_dict(model.state_dict())
        built.clear()
        assert_close(recording(x, segment_ids=seg)[0], cpu_logits, 1e-5, "shared mask", seed)
        assert len(built) == 1 and len(received) == 3 and all(r is built[0] for r in received)
        # a function without the keyword (a chapter kernel) is called as before
        plain = Transformer(model.cfg, attention=eager_attention).eval()
        plain.load_state_dict(model.state_dict())
        assert_close(plain(x, segment_ids=seg)[0], cpu_logits, 1e-5, "eager layers", seed)
        # a chunk of queries after a cache: the bottom-right causal mask, once per step
        cache, built[:] = KVCache(3), []
        model(x[:, :13], cache=cache)
        chunk = model(x[:, 13:], cache=cache)[0]
        assert len(built) == 1 and built[0].seq_lengths == (8, 21)
    assert_close(chunk, model(x)[0][:, 13:], 1e-5, "chunked prefill", seed)


# -- per-layer factories and the embed / body / head split --------------------------------------------------
def test_embed_body_head_is_forward(seed):
    model = tiny()
    x, y = torch.randint(0, 50, (2, 2, 19))
    seg = random_segments(2, 19, 3)
    positions = torch.arange(19)
    h = model.body(model.embed(x, positions), positions, segment_ids=seg)
    logits, loss = model.head(h, y)
    ref_logits, ref_loss = model(x, y, segment_ids=seg)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    h = model.embed(x)                                   # a chapter's own loop over the same modules
    for i, block in enumerate(model.blocks):
        h = block(h, positions, segment_ids=seg, layer=i)
    assert torch.equal(model.head(h)[0], ref_logits)


def test_factories_are_called_per_layer_with_cfg_and_layer():
    calls = {"positional": [], "ffn": [], "block": []}
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4)

    def positional(c, layer):
        calls["positional"].append((c, layer))
        return RotaryEmbedding(c.head_dim, base=100.0 * (layer + 1))

    def ffn(c, layer):
        calls["ffn"].append((c, layer))
        return nn.Linear(c.d_model, c.d_model)

    def block(c, layer, attn, ffn):
        calls["block"].append((c, layer, attn, ffn))
        return Block(c, attn, ffn)
    model = Transformer(cfg, positional=positional, ffn=ffn, block=block)
    for name, got in calls.items():
        assert [(c is cfg, layer) for c, layer, *_ in got] == [(True, i) for i in range(3)], name
    for i, (_, _, attn, ffn_module) in enumerate(calls["block"]):
        assert model.blocks[i].attn is attn and model.blocks[i].ffn is ffn_module
        assert isinstance(attn, Attention) and attn.positional.freqs[1].item() == pytest.approx((100.0 * (i + 1)) ** (-2 / 8))
    shared = NoPositions()
    model = Transformer(cfg, positional=shared)
    assert all(b.attn.positional is shared for b in model.blocks)


def test_per_layer_positional_is_used_by_its_layer(seed):
    bases = [10_000.0, 50.0]
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4),
                        positional=lambda c, layer: RotaryEmbedding(c.head_dim, bases[layer])).eval()
    x = torch.randint(0, 50, (2, 11))
    names = [f"blocks.{i}.attn.hook_{w}" for i in range(2) for w in ("q_pre", "q")]
    _, acts = model.run_with_cache(x, names)
    for i, base in enumerate(bases):
        rotated = apply_rotary(acts[f"blocks.{i}.attn.hook_q_pre"], torch.arange(11), rope_frequencies(8, base))
        torch.testing.assert_close(rotated, acts[f"blocks.{i}.attn.hook_q"])


class TwoBaseAttention(Attention):
    "A MoICE-like layer written from Attention's parts: per (token, head) gates over two rotary bases."
    def __init__(self, cfg, bases=(10_000.0, 300.0)):
        super().__init__(cfg, positional=NoPositions())
        self.rotaries = nn.ModuleList(RotaryEmbedding(cfg.head_dim, b, cfg.rope_layout) for b in bases)
        self.router = nn.Linear(cfg.d_model, cfg.n_heads * len(bases))

    def forward(self, x, positions, *, segment_ids=None, cache=None, layer=0, block_mask=None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        gates = self.router(x).view(B, T, self.n_heads, -1).softmax(-1).transpose(1, 2)
        return self.output(sum(gates[..., n, None] * self.attend(*rot(q, k, positions), v, segment_ids=segment_ids)
                               for n, rot in enumerate(self.rotaries)))


@pytest.mark.parametrize("choice", [0, 1])
def test_custom_attention_layer_with_one_hot_gates_is_plain_rope(seed, choice):
    base = (10_000.0, 300.0)[choice]
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, rope_base=base)
    plain = Transformer(cfg).eval()
    mixed = Transformer(cfg, attention_layer=lambda c, layer: TwoBaseAttention(c)).eval()
    missing, unexpected = mixed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("router" in m for m in missing)
    with torch.no_grad():
        for b in mixed.blocks:
            b.attn.router.weight.zero_()
            b.attn.router.bias.copy_(torch.tensor([30.0, -30.0] if choice == 0 else [-30.0, 30.0]).repeat(4))
    x = torch.randint(0, 50, (2, 15))
    seg = random_segments(2, 15, 2)
    assert_close(mixed(x, segment_ids=seg)[0], plain(x, segment_ids=seg)[0], 1e-5, "one-hot gates", seed)
    with torch.no_grad():
        mixed.blocks[0].attn.router.bias.zero_()       # both bases: now different
    assert (mixed(x)[0] - plain(x)[0]).abs().amax() > 1e-6   # a tiny random model: the change is 1e-5-1e-4; none is 0


def test_block_factory_builds_other_blocks(seed):
    class ParallelBlock(nn.Module):
        def __init__(self, cfg, attn, ffn):
            super().__init__()
            self.norm, self.attn, self.ffn = M.RMSNorm(cfg.d_model), attn, ffn

        def forward(self, x, positions, **kwargs):
            h = self.norm(x)
            return x + self.attn(h, positions, **kwargs) + self.ffn(h)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4)
    model = Transformer(cfg, block=lambda c, layer, attn, ffn: ParallelBlock(c, attn, ffn))
    x = torch.randint(0, 50, (1, 9))
    assert model(x)[0].shape == (1, 9, 50)
    assert "blocks.1.attn.hook_pattern" in model.hook_points() and "blocks.1.hook_resid_mid" not in model.hook_points()
    assert model.generate(x, 2).shape == (1, 11)


def test_factory_errors():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4)
    with pytest.raises(ValueError, match="builds its own"):
        Transformer(cfg, positional=NoPositions(), attention_layer=lambda c, i: Attention(c))
    with pytest.raises(TypeError, match="ffn factory returned str for layer 0"):
        Transformer(cfg, ffn=lambda c, i: "swiglu")
    with pytest.raises(TypeError, match="positional factory returned"):
        Transformer(cfg, positional=lambda c, i: rope_frequencies(c.head_dim))


def test_pluggable_parts_and_aux_loss(seed):
    class AuxFFN(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin = torch.nn.Linear(d, d)
            self.aux_loss = None

        def forward(self, x):
            self.aux_loss = torch.tensor(0.25)
            return self.lin(x)

    class AuxAttention(Attention):                     # an aux loss anywhere in the model counts (a MoICE router's)
        def forward(self, x, positions, **kwargs):
            self.aux_loss = torch.tensor(0.125)
            return super().forward(x, positions, **kwargs)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4)
    model = Transformer(cfg, attention=[eager_attention, sdpa_attention], positional=NoPositions(),
                        ffn=lambda c, layer: AuxFFN(c.d_model))
    x = torch.randint(0, 50, (1, 8))
    logits, loss = model(x, x)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
    torch.testing.assert_close(loss, ce + 0.5)
    model = Transformer(cfg, attention_layer=lambda c, layer: AuxAttention(c), ffn=lambda c, layer: AuxFFN(c.d_model))
    logits, loss = model(x, x)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()) + 0.75)


# -- hook points and patching -------------------------------------------------------------------------------
LAYER_HOOKS = {  # name in block i -> shape for B=2, T=10, d=32, H=4, Hkv=2, D=8, d_ffn=64
    "hook_resid_pre": (2, 10, 32), "attn_norm.hook_scale": (2, 10, 1), "attn.hook_q_pre": (2, 4, 10, 8),
    "attn.hook_k_pre": (2, 2, 10, 8), "attn.hook_q": (2, 4, 10, 8), "attn.hook_k": (2, 2, 10, 8),
    "attn.hook_v": (2, 2, 10, 8), "attn.hook_pattern": (2, 4, 10, 10), "attn.hook_z": (2, 10, 4, 8),
    "attn.hook_head_out": (2, 10, 4, 32), "hook_attn_out": (2, 10, 32), "hook_resid_mid": (2, 10, 32),
    "ffn_norm.hook_scale": (2, 10, 1), "ffn.hook_hidden": (2, 10, 64), "hook_mlp_out": (2, 10, 32),
    "hook_resid_post": (2, 10, 32),
}


def test_hook_inventory_and_shapes(seed):
    model = tiny(d_ffn=64)
    _, acts = model.run_with_cache(torch.randint(0, 50, (2, 10)))
    want = {f"blocks.{i}.{n}": s for i in range(2) for n, s in LAYER_HOOKS.items()} | {"norm.hook_scale": (2, 10, 1)}
    assert {n: tuple(a.shape) for n, a in acts.items()} == want
    assert set(hook_points(model)) == set(want) and all(not a.requires_grad for a in acts.values())
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"] + acts["blocks.0.hook_attn_out"], acts["blocks.0.hook_resid_mid"])
    torch.testing.assert_close(acts["blocks.1.ffn.hook_hidden"] @ model.blocks[1].ffn.down.weight.T, acts["blocks.1.hook_mlp_out"])


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_pattern_hook_reproduces_the_layer_output_exactly(seed, n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads)
    x = torch.randint(0, 50, (2, 13))
    seg = random_segments(2, 13, 3)
    plain = model(x, segment_ids=seg)[0]
    for layer in range(2):
        names = [f"blocks.{layer}.attn.hook_{n}" for n in ("pattern", "v", "z", "q", "k")]
        logits, acts = model.run_with_cache(x, names, segment_ids=seg)
        pattern, v, z, q, k = (acts[n] for n in names)
        assert pattern.shape == (2, 4, 13, 13)
        assert torch.equal((pattern @ expand_kv(v, 4)).transpose(1, 2), z)
        assert torch.equal(pattern, attention_weights(q, k, segment_ids=seg))
        mask = attention_mask(13, 13, segment_ids=seg).expand_as(pattern)
        assert pattern[~mask].abs().max() == 0
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 13))
        assert_close(logits, plain, 1e-5, "logits with the pattern hooked", seed)
    # an edited pattern edits the output: uniform weights over the visible keys
    uniform = lambda p: (p > 0).to(p.dtype) / (p > 0).sum(-1, keepdim=True)
    with patch(model, {"blocks.1.attn.hook_pattern": uniform}):
        edited, acts = model.run_with_cache(x, ["blocks.1.attn.hook_v", "blocks.1.attn.hook_z"], segment_ids=seg)
    v = expand_kv(acts["blocks.1.attn.hook_v"], 4)
    mask = attention_mask(13, 13, segment_ids=seg).float()
    torch.testing.assert_close(acts["blocks.1.attn.hook_z"], ((mask / mask.sum(-1, keepdim=True)) @ v).transpose(1, 2))
    assert (edited - plain).abs().amax() > 1e-4


def test_pattern_hook_uses_the_functions_reference_weights(seed):
    def hot_attention(q, k, v, *, causal=True, segment_ids=None, scale=None):        # softmax at temperature 1/4
        return sdpa_attention(q, k, v, causal=causal, segment_ids=segment_ids, scale=4 * q.shape[-1] ** -0.5)
    hot_attention.weights = lambda q, k, *, causal, segment_ids, scale: attention_weights(
        q, k, causal=causal, segment_ids=segment_ids, scale=4 * q.shape[-1] ** -0.5)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4), attention=hot_attention).eval()
    x = torch.randint(0, 50, (2, 12))
    logits, acts = model.run_with_cache(x, ["blocks.1.attn.hook_pattern"])
    assert_close(logits, model(x)[0], 1e-5, "custom weights", seed)
    plain = Transformer(model.cfg, attention=lambda q, k, v, **kw: sdpa_attention(q, k, v, **kw)).eval()
    plain.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="has no reference weights"):
        plain.run_with_cache(x, ["blocks.0.attn.hook_pattern"])


def test_pre_rotary_hooks(seed):
    for layout in ("half", "interleaved"):
        model = tiny(rope_layout=layout)
        x = torch.randint(0, 50, (2, 9))
        names = ["blocks.1.attn.hook_q_pre", "blocks.1.attn.hook_k_pre", "blocks.1.attn.hook_q", "blocks.1.attn.hook_k"]
        logits, acts = model.run_with_cache(x, names)
        freqs = rope_frequencies(8)
        for w in "qk":
            torch.testing.assert_close(apply_rotary(acts[f"blocks.1.attn.hook_{w}_pre"], torch.arange(9), freqs, layout),
                                       acts[f"blocks.1.attn.hook_{w}"])
        with patch(model, {"blocks.1.attn.hook_k_pre": lambda k: k.flip(2)}):
            a = model(x)[0]
        flipped = apply_rotary(acts["blocks.1.attn.hook_k_pre"].flip(2), torch.arange(9), freqs, layout)
        with patch(model, {"blocks.1.attn.hook_k": flipped}):
            b = model(x)[0]
        torch.testing.assert_close(a, b)
        assert (a - logits).abs().amax() > 1e-5


def test_patching_a_clean_run_restores_its_logits(seed):
    model = tiny(n_layers=3)
    clean = torch.randint(0, 50, (3, 14))
    corrupt = clean.clone()
    corrupt[:, 4] = (corrupt[:, 4] + 11) % 50
    residual = [f"blocks.{i}.hook_resid_{s}" for i in range(3) for s in ("pre", "mid", "post")]
    clean_logits, acts = model.run_with_cache(clean, residual)
    corrupt_logits = model(corrupt)[0]
    assert (corrupt_logits - clean_logits)[:, 4:].abs().amax() > 1e-3
    for name in residual:
        with patch(model, {name: acts[name]}):
            assert torch.equal(model(corrupt)[0], clean_logits), name
    with patch(model, {"blocks.0.attn.hook_q": model.run_with_cache(clean, ["blocks.0.attn.hook_q"])[1]["blocks.0.attn.hook_q"]}):
        assert not torch.equal(model(corrupt)[0], clean_logits)         # not everything restores: a negative control


def test_patch_edits_at_some_positions_like_batch_icl(seed):
    model = tiny()
    a, b = torch.randint(0, 50, (2, 2, 12))
    site = "blocks.1.hook_resid_mid"
    logits_b, acts_b = model.run_with_cache(b, [site])
    logits_a = model(a)[0]
    with patch(model, {site: lambda x: torch.cat([x[:, :-2], acts_b[site][:, -2:]], 1)}):
        patched = model(a)[0]
    assert torch.equal(patched[:, :-2], logits_a[:, :-2])
    torch.testing.assert_close(patched[:, -2:], logits_b[:, -2:])


def test_patch_semantics_and_errors(seed):
    model = tiny()
    x = torch.randint(0, 50, (2, 10))
    base = model(x)[0]
    with patch(model, {"blocks.0.hook_resid_mid": lambda act: None}):       # a function returning None only reads
        assert torch.equal(model(x)[0], base)
    _, acts = model.run_with_cache(x, ["blocks.0.hook_resid_pre"])
    mean = acts["blocks.0.hook_resid_pre"].mean(0, keepdim=True)             # [1, T, d]: mean ablation over the batch
    with patch(model, {"blocks.0.hook_resid_pre": mean}):
        ablated = model(x)[0]
    torch.testing.assert_close(ablated[0], ablated[1])
    with pytest.raises(ValueError, match=r"does not broadcast to the activation's \(2, 10, 32\)"):
        with patch(model, {"blocks.0.hook_resid_pre": torch.zeros(3, 10, 32)}):
            model(x)
    with pytest.raises(TypeError, match="not a tensor or None"):
        with patch(model, {"blocks.0.hook_resid_pre": lambda act: 1.0}):
            model(x)
    assert all(not p.active for p in hook_points(model).values())           # removed, even after an error
    assert torch.equal(model(x)[0], base)
    with model.hooks({"blocks.0.attn.hook_z": torch.zeros(2, 10, 4, 8)}), patch(model, {"blocks.1.attn.hook_z": torch.zeros(())}):
        no_attention = model(x)[0]
    with patch(model, {f"blocks.{i}.hook_attn_out": torch.zeros(()) for i in range(2)}):
        torch.testing.assert_close(model(x)[0], no_attention)


def test_bad_hook_names_list_the_valid_ones():
    model = tiny()
    with pytest.raises(KeyError) as err:
        with patch(model, {"blocks.0.hook_resid_mdi": print, "blocks.9.attn.hook_q": print}):
            pass
    msg = str(err.value)
    for part in ("'blocks.0.hook_resid_mdi' (did you mean blocks.0.hook_resid_mid", "'blocks.9.attn.hook_q'",
                 "for {i} in 0…1", "blocks.{i}.attn.hook_pattern", "blocks.{i}.ffn.hook_hidden", "norm.hook_scale"):
        assert part in msg, part
    with pytest.raises(KeyError, match="Valid names"):
        model.run_with_cache(torch.zeros(1, 3, dtype=torch.long), ["hook_everything"])


@pytest.mark.parametrize("frozen", [False, True])
def test_run_with_cache_keeps_the_graph_for_attribution(seed, frozen):
    model = tiny().requires_grad_(not frozen)
    x = torch.randint(0, 50, (2, 10))
    site = "blocks.0.hook_resid_mid"
    metric = lambda logits: logits[:, -1, 3].sum() - logits[:, -1, 5].sum()
    logits, acts = model.run_with_cache(x, [site, "blocks.1.hook_resid_mid"], detach=False)
    grad = torch.autograd.grad(metric(logits), acts[site])[0]
    leaf = acts[site].detach().clone().requires_grad_()
    with patch(model, {site: leaf}):
        metric(model(x)[0]).backward()
    torch.testing.assert_close(grad, leaf.grad)
    assert grad.abs().amax() > 0
    _, detached = model.run_with_cache(x, [site])
    assert not detached[site].requires_grad


def test_head_scaling_hook_equals_folding_into_o_proj(seed):
    model = tiny(n_kv_heads=2)
    x = torch.randint(0, 50, (2, 11))
    tau = torch.rand(2, 4) * 2
    edits = {f"blocks.{i}.attn.hook_head_out": (lambda h, t=tau[i]: h * t[:, None]) for i in range(2)}
    with patch(model, edits):
        scaled = model(x)[0]
    with torch.no_grad():
        for i, b in enumerate(model.blocks):
            b.attn.o_proj.weight.mul_(tau[i].repeat_interleave(8))
    torch.testing.assert_close(model(x)[0], scaled, rtol=1e-4, atol=1e-5)


def test_direct_logit_attribution_is_complete_with_the_final_scale_frozen(seed):
    model = tiny(n_layers=3)
    x = torch.randint(0, 50, (2, 10))
    parts = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_{s}_out" for i in range(3) for s in ("attn", "mlp")]
    logits, acts = model.run_with_cache(x, parts + ["norm.hook_scale"])
    unembed = lambda part: (part * acts["norm.hook_scale"] * model.norm.weight) @ model.lm_head.weight.T
    torch.testing.assert_close(sum(unembed(acts[p]) for p in parts), logits, rtol=1e-4, atol=1e-5)
