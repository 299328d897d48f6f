import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET=1 when no GPU is visible)
import math

import pytest
import torch
import torch.nn.functional as F

from lmcourse.aoe import (AoELayer, MoELayer, aoe_d_wide, aoe_expert_params, aoe_gate, aoe_gate_reference, gate_weights,
                          grouped_swiglu, grouped_swiglu_reference, moe_expert_params, param_mismatch, routing_stats,
                          sort_by_expert, tile_schedule, topk_softmax)
from lmcourse.model import ModelConfig, Transformer
from lmcourse.testing import (assert_close, check_against_reference, gpu_tiles, kernel_device, kernel_dtypes,
                              random_tensors, tolerance)

DEV = kernel_device()


@pytest.fixture(params=["own", "gpu"])
def tiles(request):
    """Run a kernel test twice: with the launchers' block sizes for this device, and inside `gpu_tiles()` with the
    GPU's (on a CPU, in the interpreter), so that its shapes are several GPU blocks long there too."""
    if request.param == "gpu":
        with gpu_tiles():
            yield request.param
    else:
        yield request.param


def test_d_wide_and_param_match():
    assert aoe_d_wide(768, 3072, 256) == 3840
    assert aoe_d_wide(768, 3072, 512) == 3264
    assert aoe_d_wide(384, 1536, 128) == 1920
    assert aoe_d_wide(1280, 5120, 400) == 6470                    # the paper's 4B model: the ceiling of 6469.19
    assert aoe_expert_params(768, 256, 3840) == moe_expert_params(768, 3072)
    m = param_mismatch(768, 3072, 64)
    assert m["d_wide"] == 4393 and m["diff"] == aoe_expert_params(768, 64, 4393) - 3 * 768 * 3072
    assert abs(m["rel_diff"]) < 1e-3
    for d, F_, r in [(768, 3072, 64), (768, 3072, 128), (1280, 5120, 400), (64, 128, 16), (32, 64, 8)]:
        m = param_mismatch(d, F_, r)                               # the smallest width that is not smaller than MoE
        assert m["diff"] >= 0 > aoe_expert_params(d, r, m["d_wide"] - 1) - m["moe_expert"]
    assert param_mismatch(1280, 5120, 400)["diff"] == 2400
    with pytest.raises(ValueError):
        aoe_d_wide(768, 3072, 0)


def test_topk_softmax_is_renormalised_full_softmax():
    (s,), _ = random_tensors([(50, 8)], dtype=torch.float64, device="cpu", scale=3.0)
    idx, w = topk_softmax(s, 3)
    p = torch.gather(torch.softmax(s, -1), 1, idx)
    torch.testing.assert_close(w.double(), p / p.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)
    idx, w = topk_softmax(s, 3, renormalize=False)                 # the MegaBlocks / Switch gate: p itself
    torch.testing.assert_close(w, torch.gather(torch.softmax(s, -1), 1, idx))
    assert (w.sum(-1) < 1).all()


def _assert_topk_of(norms, idx, k):
    "The kernel's indices are K distinct experts, best first, none beaten by an unselected expert (its own norms)."
    norms, idx = norms.double().cpu(), idx.long().cpu()
    chosen = torch.gather(norms, 1, idx)
    assert (chosen[:, :-1] >= chosen[:, 1:]).all(), "top-K not in descending order"
    rest = norms.scatter(1, idx, float("-inf"))
    assert (rest.isinf().sum(1) == k).all(), "an expert chosen twice"
    assert (rest.max(1).values <= chosen[:, -1]).all(), "an unselected expert has a larger norm"


def _gate_outputs(k, renormalize):
    return lambda x, w: [aoe_gate(x, w, k, renormalize)[i] for i in (0, 1, 3, 5)]   # cache, norms, weights, prob_sum


def _gate_reference_given(idx, k, renormalize):
    """The float64 reference gate with the kernel's selection `idx`: under TF32 (fp32 on a GPU) or fp16 two near-tied
    experts may swap places, and then the values still agree but the indices do not."""
    def ref(x, w):
        cache, norms, *_, prob_sum = aoe_gate_reference(x, w, k)
        return [cache, norms, gate_weights(norms, idx.long().to(norms.device), renormalize), prob_sum]
    return ref


def _check_gate(T, d, n, r, k, dtype=torch.float32, renormalize=True):
    (x, w), seed = random_tensors([(T, d), (n, d, r)], device=DEV, dtype=dtype)
    _, norms, idx, _, counts, _ = aoe_gate(x, w, k, renormalize)
    _assert_topk_of(norms, idx, k)
    assert torch.equal(counts.long().cpu(), torch.bincount(idx.long().flatten().cpu(), minlength=n))
    ref_norms = aoe_gate_reference(x.double(), w.double(), k)[1]
    tol = max(tolerance(dtype, DEV), 1e-4)                         # 1e-4: fp32 sums of squares over r
    assert_close(torch.gather(norms, 1, idx.long()), torch.topk(ref_norms, k).values, tol, "top-K norms", seed)
    check_against_reference(_gate_outputs(k, renormalize), _gate_reference_given(idx, k, renormalize), [x, w],
                            seed=seed, tol=tol)


# T and every reduced dimension (d, r) several blocks long, at the launcher's blocks (CPU: BLOCK_M 16, BLOCK_D and
# BLOCK_R up to 64) and at the GPU's (BLOCK_M 64, BLOCK_D 64, BLOCK_R 128); ragged last blocks everywhere
GATE_LONG = {"own": (40, 150, 3, 140), "gpu": (150, 200, 3, 300)}


@pytest.mark.gpu
@pytest.mark.parametrize("T,d,n,r,k", [(37, 32, 5, 8, 2), (16, 24, 8, 20, 1), (33, 16, 4, 16, 3), (70, 40, 3, 72, 2)])
def test_aoe_gate_matches_reference(T, d, n, r, k):
    _check_gate(T, d, n, r, k)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("renormalize", [True, False])
def test_aoe_gate_several_blocks_long(k, renormalize, tiles):
    _check_gate(*GATE_LONG[tiles], k, renormalize=renormalize)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_aoe_gate_dtypes(dtype):
    _check_gate(24, 96, 4, 80, 2, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 4 GiB of cache on a GPU")
def test_aoe_gate_int64_offsets():
    "T·n·r ≥ 2³¹: the cache offsets of the last tokens overflow int32."
    n, d, r, k = 8, 64, 512, 2
    T = 2**31 // (n * r) + 64
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, d, r, device="cuda", dtype=torch.bfloat16, generator=g)
    cache, norms, idx, weights, counts, _ = aoe_gate(x, w, k)
    assert counts.sum().item() == T * k
    tail = slice(T - 200, T)
    ref_cache, ref_norms = aoe_gate_reference(x[tail].double(), w.double(), k)[:2]
    assert_close(cache[tail], ref_cache, 3e-2, "cache of the last tokens")
    assert_close(norms[tail], ref_norms, 3e-2, "norms of the last tokens")


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


# several blocks long in R and d (the forward's two K-loops), D (N tiles; the K-loop of the down-projection and of
# the backward's dh) and each expert's rows (M tiles; the weight gradients' row loop), at the launcher's blocks
# (CPU: 16×32×32) and at the GPU's (64×128×64)
GROUPED_LONG = {"own": (40, 80, 3, 70, 72, 2), "gpu": (100, 140, 3, 150, 300, 2)}


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["aoe", "moe"])
def test_grouped_swiglu_several_blocks_long(layout, tiles):
    _check_grouped(layout, *GROUPED_LONG[tiles], empty=None)


def _check_grouped(layout, T, d, n, R, D, k, empty):
    if layout == "moe": R = d
    sort = _routing(T, n, k, seed=T + n, empty_expert=empty)
    z_rows = sort.tokens * n + sort.experts if layout == "aoe" else sort.tokens
    nz = T * n if layout == "aoe" else T
    (z, x, wg, wp, wo), seed = random_tensors([(nz, R), (T, d), (n, R, D), (n, d, D), (n, D, d)], device=DEV, scale=0.5)
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
    torch.manual_seed(0)
    model = Transformer(cfg, ffn=lambda c, i: AoELayer.from_config(c, d_low=8, n_experts=4, top_k=2, impl="torch"))
    tokens = torch.randint(0, 64, (2, 12))
    loss = model(tokens, tokens)[1]
    ce = F.cross_entropy(model(tokens)[0].flatten(0, 1), tokens.flatten())
    aux = sum(b.ffn.aux_loss for b in model.blocks)
    torch.testing.assert_close(loss, ce + aux)
    layer = model.blocks[0].ffn
    # at initialisation the norms are small and nearly equal, so P ≈ 1/n and n Σ f P ≈ Σ f = K (not a bound: see below)
    assert abs(layer.balance_loss.item() - 2) < 0.05
    torch.testing.assert_close(aux, 0.01 * sum(b.ffn.balance_loss for b in model.blocks) / len(model.blocks))
    assert 0 < layer.load_entropy.item() <= math.log(4) + 1e-6
    assert 0 < layer.selection_entropy.item() <= math.log(4) + 1e-6
    assert layer.last_topk.shape == (2, 12, 2) and layer.expert_counts.sum().item() == 2 * 12 * 2
    model.eval()
    torch.testing.assert_close(model(tokens, tokens)[1], ce)


def test_balance_loss_is_K_when_f_or_P_is_uniform_and_not_bounded_by_K():
    scores = torch.zeros(3, 2)
    uniform_p = routing_stats(scores, torch.tensor([2, 1]), torch.tensor([1.5, 1.5]), top_k=1)["balance_loss"]
    uniform_f = routing_stats(scores, torch.tensor([3, 3]), torch.tensor([0.5, 2.5]), top_k=2)["balance_loss"]
    torch.testing.assert_close(uniform_p, torch.tensor(1.0)); torch.testing.assert_close(uniform_f, torch.tensor(2.0))
    below = routing_stats(scores, torch.tensor([2, 1]), torch.tensor([3 * 0.433, 3 * 0.567]), top_k=1)["balance_loss"]
    assert abs(below.item() - 0.956) < 1e-3                     # f = (2/3, 1/3), P = (0.433, 0.567): n Σ f P < K


@pytest.mark.parametrize("kind", ["aoe", "moe"])
def test_top1_gate_gets_a_task_gradient_only_without_renormalisation(kind):
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    for renormalize in (True, False):
        layer = (AoELayer(16, 8, 32, n_experts=4, top_k=1, impl="torch", renormalize=renormalize) if kind == "aoe" else
                 MoELayer(16, 32, n_experts=4, top_k=1, impl="torch", renormalize=renormalize))
        layer(x).square().sum().backward()
        if kind == "moe":                                     # the router reaches the loss only through g
            assert (layer.router.weight.grad.norm() > 0) == (not renormalize)
        else:                                                 # W_down also feeds the experts through the cache
            assert layer.w_down.grad.norm() > 0


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
