import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET=1 when no GPU is visible)
import math

import pytest
import torch
import torch.nn.functional as F

from lmcourse.aoe import (AoELayer, MoELayer, aoe_d_wide, aoe_expert_params, aoe_gate, aoe_gate_reference,
                          grouped_swiglu, grouped_swiglu_reference, moe_expert_params, param_mismatch,
                          sort_by_expert, tile_schedule, topk_softmax)
from lmcourse.model import ModelConfig, Transformer
from lmcourse.testing import (check_against_reference, decisive_rows, gpu_tiles, kernel_device, kernel_dtypes,
                              random_tensors, tolerance)

DEV = kernel_device()


def test_d_wide_and_param_match():
    assert aoe_d_wide(768, 3072, 256) == 3840
    assert aoe_d_wide(768, 3072, 512) == 3264
    assert aoe_d_wide(384, 1536, 128) == 1920
    assert aoe_expert_params(768, 256, 3840) == moe_expert_params(768, 3072)
    m = param_mismatch(768, 3072, 64)
    assert m["d_wide"] == 4393 and m["diff"] == aoe_expert_params(768, 64, 4393) - 3 * 768 * 3072
    assert abs(m["rel_diff"]) < 1e-3
    with pytest.raises(ValueError):
        aoe_d_wide(768, 3072, 0)


def test_topk_softmax_is_renormalised_full_softmax():
    (s,), _ = random_tensors([(50, 8)], dtype=torch.float64, device="cpu", scale=3.0)
    idx, w = topk_softmax(s, 3)
    p = torch.gather(torch.softmax(s, -1), 1, idx)
    torch.testing.assert_close(w.double(), p / p.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)


def _gate_outputs(fn, k):
    return lambda x, w: [fn(x, w, k)[i] for i in (0, 1, 3, 5)]   # cache, norms, weights, prob_sum


def _decided_tokens(T, d, n, r, k, dtype=torch.float32):
    """Random x [T', d], w_down [n, d, r] keeping only the tokens whose top-k experts the float64 norms decide by more
    than the kernel's error in them: fp32 sums of the products, which are TF32 for fp32 inputs on a GPU (exact for
    16-bit inputs). A token's routing depends on its own row only, so the others can be dropped, and everything
    downstream of the choice (weights, counts, gradients) is then compared exactly."""
    (x, w), seed = random_tensors([(T, d), (n, d, r)], device=DEV, dtype=dtype)
    norms = aoe_gate_reference(x.double(), w.double(), k)[1]
    keep = decisive_rows(norms, k, 2 * tolerance(torch.float32, DEV))
    assert keep.sum() >= T // 2, f"only {int(keep.sum())} of {T} tokens are routed decisively (seed={seed})"
    return x[keep].contiguous(), w, seed


def _check_gate(T, d, n, r, k, dtype=torch.float32, tol=None):
    x, w, seed = _decided_tokens(T, d, n, r, k, dtype)
    _, _, idx, _, counts, _ = aoe_gate(x, w, k)
    _, _, ridx, _, rcounts, _ = aoe_gate_reference(x.double(), w.double(), k)
    assert torch.equal(idx.long().cpu(), ridx.cpu()), f"seed={seed}"
    assert torch.equal(counts.long().cpu(), rcounts.cpu())
    assert counts.sum().item() == len(x) * k
    check_against_reference(_gate_outputs(aoe_gate, k), _gate_outputs(aoe_gate_reference, k), [x, w], seed=seed, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("T,d,n,r,k", [(37, 32, 5, 8, 2), (16, 24, 8, 20, 1), (33, 16, 4, 16, 3), (70, 40, 3, 72, 2)])
def test_aoe_gate_matches_reference(T, d, n, r, k):
    _check_gate(T, d, n, r, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_aoe_gate_dtypes(dtype):
    _check_gate(24, 32, 4, 16, 2, dtype, tol=max(tolerance(dtype, DEV), 1e-4))


def test_aoe_gate_rejects_bad_input():
    x, w = torch.randn(8, 16, device=DEV), torch.randn(4, 16, 8, device=DEV)
    with pytest.raises(ValueError, match="top_k"):
        aoe_gate(x, w, 5)
    with pytest.raises(ValueError, match="d="):
        aoe_gate(torch.randn(8, 12, device=DEV), w, 2)
    with pytest.raises(ValueError, match="dtype|is torch"):
        aoe_gate(x.half(), w, 2)


def _routing(T, n, k, seed, empty_expert=None):
    g = torch.Generator().manual_seed(seed)
    choices = n if empty_expert is None else n - 1
    idx = torch.stack([torch.randperm(choices, generator=g)[:k] for _ in range(T)])
    if empty_expert is not None: idx[idx >= empty_expert] += 1
    return sort_by_expert(idx.to(DEV), torch.bincount(idx.flatten(), minlength=n).to(DEV))


@pytest.mark.parametrize("layout", ["aoe", "moe"])
@pytest.mark.parametrize("T,d,n,R,D,k,empty", [(37, 32, 5, 8, 40, 2, None), (29, 24, 4, 24, 33, 1, None),
                                                 (20, 16, 4, 16, 48, 2, 2)])
@pytest.mark.gpu
def test_grouped_swiglu_matches_reference(layout, T, d, n, R, D, k, empty):
    _check_grouped(layout, T, d, n, R, D, k, empty)


def _check_grouped(layout, T, d, n, R, D, k, empty=None, scale=0.5):
    "grouped_swiglu against its reference, AoE layout (z [T·n, R] rows) or MoE layout (z = x, R = d)."
    if layout == "moe": R = d
    sort = _routing(T, n, k, seed=T + n, empty_expert=empty)
    z_rows = sort.tokens * n + sort.experts if layout == "aoe" else sort.tokens
    nz = T * n if layout == "aoe" else T
    (z, x, wg, wp, wo), seed = random_tensors([(nz, R), (T, d), (n, R, D), (n, d, D), (n, D, d)], device=DEV, scale=scale)
    if layout == "moe": z = x
    inputs = [x, wg, wp, wo] if layout == "moe" else [z, x, wg, wp, wo]
    wrap = lambda fn: ((lambda x, *w: fn(x, x, *w, z_rows, sort.tokens, sort.offsets)) if layout == "moe"
                       else (lambda *a: fn(*a, z_rows, sort.tokens, sort.offsets)))
    check_against_reference(wrap(grouped_swiglu), wrap(grouped_swiglu_reference), inputs, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_grouped_swiglu_dtypes(dtype):
    T, d, n, R, D = 24, 32, 4, 16, 32
    sort = _routing(T, n, 2, seed=1)
    z_rows = sort.tokens * n + sort.experts
    (z, x, wg, wp, wo), seed = random_tensors([(T * n, R), (T, d), (n, R, D), (n, d, D), (n, D, d)], device=DEV,
                                              dtype=dtype, scale=0.5)
    check_against_reference(lambda *a: grouped_swiglu(*a, z_rows, sort.tokens, sort.offsets),
                            lambda *a: grouped_swiglu_reference(*a, z_rows, sort.tokens, sort.offsets),
                            [z, x, wg, wp, wo], seed=seed)


# The GPU's tiles in the interpreter (the launchers' heuristic: gate BLOCK_M=64, BLOCK_D=64, BLOCK_R=128; grouped
# matmuls BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), on problems several blocks long in every reduced dimension (d and r
# of the gate; R, d and D of the experts) and with ragged last tiles, so the K-loops must accumulate as on a GPU.
@pytest.mark.gpu
def test_gate_at_gpu_tiles():
    with gpu_tiles():
        _check_gate(T=150, d=150, n=5, r=200, k=2)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["aoe", "moe"])
def test_grouped_swiglu_at_gpu_tiles(layout):
    with gpu_tiles():                                                # 200 sorted rows: about 67 per expert
        _check_grouped(layout, T=100, d=150, n=3, R=150, D=300, k=2, scale=0.3)


def test_tile_schedule_covers_every_row_once():
    counts = torch.tensor([0, 5, 16, 17, 1])
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
    tile_expert, tile_start = tile_schedule(offsets, int(counts.sum()), 16)
    rows = []
    for e, s in zip(tile_expert.tolist(), tile_start.tolist()):
        if e < len(counts): rows += list(range(s, min(s + 16, offsets[e + 1].item())))
    assert rows == list(range(int(counts.sum())))


def test_grouped_swiglu_rejects_bad_shapes():
    sort = _routing(8, 4, 2, seed=0)
    x = torch.randn(8, 16, device=DEV)
    wg, wp, wo = torch.randn(4, 16, 32, device=DEV), torch.randn(4, 16, 32, device=DEV), torch.randn(4, 32, 8, device=DEV)
    with pytest.raises(ValueError, match="w_p"):
        grouped_swiglu(x, x, wg, wp, wo, sort.tokens, sort.tokens, sort.offsets)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["aoe", "moe"])
def test_layer_triton_equals_torch_in_a_transformer(kind):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ffn=64, max_seq_len=32)
    torch.manual_seed(0)
    make = (lambda c, i: AoELayer.from_config(c, d_low=8, n_experts=4, top_k=2)) if kind == "aoe" else \
           (lambda c, i: MoELayer.from_config(c, n_experts=4, top_k=2))
    model = Transformer(cfg, ffn=make).to(DEV)
    tokens = torch.randint(0, 64, (2, 12), device=DEV)
    results = {}
    for impl in ("torch", "triton"):
        for b in model.blocks: b.ffn.impl = impl
        model.zero_grad()
        loss = model(tokens, tokens)[1]
        loss.backward()
        results[impl] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    for k, g in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_engine_adds_aux_loss_only_in_training():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ffn=64, max_seq_len=32)
    model = Transformer(cfg, ffn=lambda c, i: AoELayer.from_config(c, d_low=8, n_experts=4, top_k=2, impl="torch"))
    tokens = torch.randint(0, 64, (2, 12))
    loss = model(tokens, tokens)[1]
    ce = F.cross_entropy(model(tokens)[0].flatten(0, 1), tokens.flatten())
    aux = sum(b.ffn.aux_loss for b in model.blocks)
    torch.testing.assert_close(loss, ce + aux)
    layer = model.blocks[0].ffn
    assert layer.balance_loss.item() >= 2 * 0.999            # n Σ f P ≥ K, equality when balanced
    assert 0 < layer.load_entropy.item() <= math.log(4) + 1e-6
    assert 0 < layer.selection_entropy.item() <= math.log(4) + 1e-6
    assert layer.last_topk.shape == (2, 12, 2) and layer.expert_counts.sum().item() == 2 * 12 * 2
    model.eval()
    torch.testing.assert_close(model(tokens, tokens)[1], ce)


def test_layers_reject_bad_config():
    with pytest.raises(ValueError, match="top_k"):
        AoELayer(32, 8, 64, n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="impl"):
        MoELayer(32, 64, impl="cuda")
    with pytest.raises(ValueError, match="last dimension"):
        MoELayer(32, 64, n_experts=4, impl="torch")(torch.randn(3, 16))


def test_aoe_routing_is_even_router_is_odd():
    layer = AoELayer(16, 8, 32, n_experts=4, top_k=1, impl="torch")
    moe = MoELayer(16, 32, n_experts=2, top_k=1, impl="torch")
    x = torch.randn(64, 16)
    layer(x); pos = layer.last_topk.clone(); layer(-x)
    assert torch.equal(pos, layer.last_topk)                  # ||(-x) W|| = ||x W||
    moe(x); pos = moe.last_topk.clone(); moe(-x)
    assert torch.equal(pos, 1 - moe.last_topk)                # a bias-free linear router flips for -x
