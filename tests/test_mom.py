import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET=1 when no GPU is visible)
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from lmcourse.mom import (MoMChunk, MoMConfig, StraightThroughSign, balance_loss, computation_depth, kernel_vs_loop,
                          mom_chunk, mom_from_vanilla, mom_model, mom_moe, moe_reference, pointer_chasing_batch,
                          pointer_graph, route, routed_linear, routed_linear_reference, routed_linear_simple, rms_scale,
                          exercise_rounds_beyond_pool, exercise_ste_gradient, exercise_token_skip)
from lmcourse.model import ModelConfig, Transformer
from lmcourse.testing import (LaunchError, assert_close, check_against_reference, gpu_tiles, kernel_device,
                              kernel_dtypes, poisoned_outputs, random_tensors, rel_error, tolerance)

DEV = kernel_device()


@pytest.fixture(params=["own", "gpu"])
def tiles(request):
    "Each kernel test with this device's blocks and inside gpu_tiles() with the GPU's (64 x 128 x 64) in the interpreter."
    if request.param == "gpu":
        with gpu_tiles():
            yield request.param
    else:
        yield request.param


def _choices(N, M, seed, skip=True):
    return torch.randint(0, M + skip, (N,), generator=torch.Generator().manual_seed(seed)).to(DEV)


# (N, K, Nout, M): odd sizes; K spans several CPU blocks (32) and, in the GPU-tile runs, several GPU blocks (64)
SHAPES = [(37, 80, 72, 3), (130, 200, 150, 4), (9, 16, 16, 1), (64, 136, 40, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("N,K,NOUT,M", SHAPES)
@pytest.mark.parametrize("norm,weighted", [(True, False), (False, True), (True, True), (False, False)])
def test_routed_linear_vs_float64(tiles, N, K, NOUT, M, norm, weighted):
    shapes = [(N, K), (M, K, NOUT)] + ([(M, K)] if norm else []) + ([(N,)] if weighted else [])
    tensors, seed = random_tensors(shapes, device=DEV)
    choice = _choices(N, M, seed)
    def split(ts):
        x, w, *rest = ts
        return x, w, rest.pop(0) if norm else None, rest.pop(0) if weighted else None
    print("seed", seed)
    check_against_reference(lambda *ts: routed_linear(split(ts)[0], choice, *split(ts)[1:]),
                            lambda *ts: routed_linear_reference(split(ts)[0], choice, *split(ts)[1:]), tensors, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_routed_linear_dtypes_and_large_inputs(tiles, dtype):
    "fp16 (and bf16 on a GPU) against float64, with large-magnitude rows (the norm must stay exact), non-default eps."
    (x, w, g, rw), seed = random_tensors([(70, 96, ), (3, 96, 48), (3, 96), (70,)], device=DEV)
    x = (x * torch.logspace(-2, 3, 70, device=DEV)[:, None]).to(dtype)
    w, g = w.to(dtype), g.to(dtype)
    choice = _choices(70, 3, seed)
    y = routed_linear(x, choice, w, g, rw, eps=1e-3)
    ref = routed_linear_reference(x.double(), choice, w.double(), g.double(), rw.double(), eps=1e-3)
    assert_close(y, ref.to(dtype), tolerance(dtype, DEV), seed=seed)


@pytest.mark.gpu
def test_skip_rows_are_zero_and_outputs_poisoned(tiles):
    (x, w, g), seed = random_tensors([(50, 64), (2, 64, 40), (2, 64)], device=DEV)
    choice = _choices(50, 2, seed)
    choice[:5] = 2                                                     # some SKIP for sure
    with poisoned_outputs():
        y = routed_linear(x, choice, w, g)
    assert torch.isfinite(y).all()
    assert (y[choice == 2] == 0).all() and (y[choice < 2].abs().sum(1) > 0).all()


@pytest.mark.gpu
def test_all_skip_and_one_module(tiles):
    (x, w), _ = random_tensors([(20, 32), (2, 32, 16)], device=DEV)
    assert (routed_linear(x, torch.full((20,), 2, device=DEV), w) == 0).all()
    y = routed_linear(x, torch.zeros(20, dtype=torch.long, device=DEV), w)
    assert_close(y, (x.double() @ w[0].double()).float())


@pytest.mark.gpu
def test_transposed_weight_view(tiles):
    "Stacked nn.Linear weights [M, Nout, K] passed as a transposed view, as the chunk does."
    (x, w_nk, g), seed = random_tensors([(40, 48), (3, 56, 48), (3, 48)], device=DEV)
    choice = _choices(40, 3, seed)
    check_against_reference(lambda x, w, g: routed_linear(x, choice, w.transpose(1, 2), g),
                            lambda x, w, g: routed_linear_reference(x, choice, w.transpose(1, 2), g), [x, w_nk, g], seed=seed)


@pytest.mark.gpu
def test_teaching_kernel():
    (x, w, g, rw), seed = random_tensors([(45, 70), (3, 70, 40), (3, 70), (45,)], device=DEV)
    choice = _choices(45, 3, seed)
    ref = routed_linear_reference(x.double(), choice, w.double(), g.double(), rw.double())
    assert_close(routed_linear_simple(x, choice, w, g, rms_scale(x, 1e-5) * rw), ref.float(), seed=seed)


def test_bad_inputs():
    (x, w, g), _ = random_tensors([(10, 32), (2, 32, 16), (2, 32)], device=DEV)
    choice = torch.zeros(10, dtype=torch.long, device=DEV)
    for call, message in [(lambda: routed_linear(x, choice + 3, w), "module ids must lie in [0, 2]"),
                          (lambda: routed_linear(x, choice - 1, w), "module ids must lie"),
                          (lambda: routed_linear(x[:, :16], choice, w), "x must be [N, K]"),
                          (lambda: routed_linear(x, choice[:5], w), "choice must be an integer [N=10]"),
                          (lambda: routed_linear(x, choice.float(), w), "choice must be an integer"),
                          (lambda: routed_linear(x, choice, w, g[:, :8]), "gain must be [M, K]"),
                          (lambda: routed_linear(x, choice, w, row_weight=torch.ones(3, device=DEV)), "row_weight must be [N=10]"),
                          (lambda: routed_linear(x, choice, w.half()), "share one dtype"),
                          (lambda: routed_linear(x.double(), choice, w.double()), "supports")]:
        with pytest.raises((ValueError, LaunchError), match=None) as e:
            call()
        assert message in str(e.value), (message, str(e.value))
    if DEV.type == "cpu":
        with pytest.raises(LaunchError, match="interpreter"):
            routed_linear(x.bfloat16(), choice, w.bfloat16())


def test_route_and_straight_through():
    (s,), _ = random_tensors([(30, 5)], device="cpu", scale=3.0)
    s.requires_grad_()
    choice, w, p = route(s, 0.2)
    assert torch.equal(choice, s.argmax(-1, keepdim=True)) and torch.equal(w, p.max(-1, keepdim=True).values)
    choice, w, _ = route(s, 0.2, straight_through=True)
    assert (w == 1).all()
    up = torch.linspace(-5, 5, 30)[:, None]
    (w * up).sum().backward()
    # d sign(w)/dw passes up clipped to [-1, 1], then through the softmax: compare with the clipped soft gradient
    s2 = s.detach().clone().requires_grad_()
    _, w2, _ = route(s2, 0.2)
    (w2 * up.clamp(-1, 1)).sum().backward()
    assert torch.allclose(s.grad, s2.grad) and s.grad.abs().sum() > 0
    assert torch.equal(StraightThroughSign.apply(torch.tensor([0.3, -2.0])), torch.tensor([1.0, -1.0]))


def test_balance_loss():
    n = 4
    assert abs(balance_loss(torch.full((8, n), 1 / n), torch.arange(8) % n).item() - 1) < 1e-6
    collapsed = torch.zeros(8, n); collapsed[:, 0] = 1
    assert abs(balance_loss(collapsed, torch.zeros(8, dtype=torch.long)).item() - n) < 1e-6


def _cfg(n_layers, **kw):
    return ModelConfig(vocab_size=48, d_model=32, n_layers=n_layers, n_heads=2, n_kv_heads=kw.pop("n_kv_heads", 2), d_ffn=64,
                       max_seq_len=32, **kw)


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_identity_routing_is_vanilla(n_kv_heads):
    torch.manual_seed(0)
    vanilla = Transformer(_cfg(4, n_kv_heads=n_kv_heads)).eval()
    tokens = torch.randint(0, 48, (3, 17))
    for mcfg, routes in [(MoMConfig(n_bottom=0, pool_size=4, rounds=4, n_top=0, impl="torch"), [(h, h) for h in range(4)]),
                         (MoMConfig(n_bottom=1, pool_size=2, rounds=2, n_top=1, impl="torch"), [(0, 0), (1, 1)])]:
        mom = mom_from_vanilla(vanilla, mcfg).eval()
        mom_chunk(mom).forced_routes = routes
        with torch.no_grad():
            assert (mom(tokens)[0] - vanilla(tokens)[0]).abs().max() < 1e-5
            mom_chunk(mom).mcfg = replace(mcfg, impl="triton")            # the kernel path, to fp32 tolerance
            assert_close(mom(tokens)[0], vanilla(tokens)[0].double(), 1e-5)


def test_skip_is_layer_skipping_and_m1_is_weight_sharing():
    torch.manual_seed(1)
    vanilla = Transformer(_cfg(3)).eval()
    tokens = torch.randint(0, 48, (2, 11))
    mom = mom_from_vanilla(vanilla, MoMConfig(n_bottom=0, pool_size=3, rounds=3, n_top=0, impl="torch")).eval()
    mom_chunk(mom).forced_routes = [(0, 0), (3, 3), (2, 2)]
    shallow = copy.deepcopy(vanilla)
    shallow.blocks = nn.ModuleList([shallow.blocks[0], shallow.blocks[2]])
    with torch.no_grad():
        assert torch.equal(mom(tokens)[0], shallow(tokens)[0])
    one = Transformer(_cfg(1)).eval()
    shared = mom_from_vanilla(one, MoMConfig(n_bottom=0, pool_size=1, rounds=4, n_top=0, skip=False, impl="torch")).eval()
    looped = copy.deepcopy(one)
    looped.blocks = nn.ModuleList([looped.blocks[0]] * 4)
    with torch.no_grad():
        assert torch.equal(shared(tokens)[0], looped(tokens)[0])
    assert exercise_rounds_beyond_pool() == 0.0


def test_params_and_depth():
    torch.manual_seed(0)
    mcfg = MoMConfig(n_bottom=2, pool_size=3, rounds=7, n_top=1, router="gru", router_dim=16)
    vanilla = Transformer(_cfg(mcfg.vanilla_layers))
    mom = mom_from_vanilla(vanilla, mcfg)
    chunk = mom_chunk(mom)
    routers = sum(p.numel() for r in (chunk.attn_router, chunk.ffn_router) for p in r.parameters())
    assert mom.num_params() - vanilla.num_params() == routers
    d = computation_depth(mom, torch.randint(0, 48, (2, 9)))
    assert d["depth"] == mcfg.depth == 10 and d["mean_token_depth"] <= d["depth"]
    skips = chunk.attn_counts[:, -1].sum().item() / 18
    assert abs(d["mean_token_depth"] - (10 - skips)) < 1e-9
    with pytest.raises(ValueError, match="needs 6"):
        mom_from_vanilla(Transformer(_cfg(4)), mcfg)


@pytest.mark.parametrize("router,ste,top_k", [("mlp", False, 1), ("gru", True, 1), ("mlp", False, 2), ("gru", False, 3)])
def test_kernel_path_matches_loop_with_gradients(router, ste, top_k):
    torch.manual_seed(2)
    mom = mom_model(_cfg(1, n_kv_heads=1), MoMConfig(n_bottom=1, pool_size=3, rounds=2, n_top=0, router=router,
                                                     straight_through=ste, router_dim=16, top_k=top_k))
    r = kernel_vs_loop(mom, torch.randint(0, 48, (2, 13)))
    assert r["logits"] < 1e-5 and r["worst_grad"] < 1e-4 and r["grads"] == len(list(mom.parameters()))


def test_gradients_reach_routers_and_aux_loss():
    torch.manual_seed(3)
    mom = mom_model(_cfg(1), MoMConfig(n_bottom=0, pool_size=2, rounds=3, n_top=1, router_dim=16, impl="torch")).train()
    tokens = torch.randint(0, 48, (2, 10))
    _, loss = mom(tokens, tokens)
    chunk = mom_chunk(mom)
    assert chunk.aux_loss is not None and chunk.aux_loss > 0
    loss.backward()
    for r in (chunk.attn_router, chunk.ffn_router):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters())
    assert chunk.attn_counts.shape == (3, 3) and (chunk.attn_counts.sum(1) == 20).all()
    mom.eval()
    mom(tokens)
    assert chunk.aux_loss is None


def test_forced_route_errors_and_no_cache():
    mom = mom_model(_cfg(1), MoMConfig(n_bottom=0, pool_size=2, rounds=2, n_top=0))
    chunk = mom_chunk(mom)
    tokens = torch.randint(0, 48, (1, 5))
    chunk.forced_routes = [(0, 0)]
    with pytest.raises(ValueError, match="needs 2"):
        mom(tokens)
    chunk.forced_routes = [(0, 0), (5, 0)]
    with pytest.raises(ValueError, match="module ids in \\[0, 2\\]"):
        mom(tokens)
    chunk.forced_routes = None
    from lmcourse.model import KVCache
    with pytest.raises(ValueError, match="no KV cache"):
        mom(tokens, cache=KVCache(len(mom.blocks)))


def test_pointer_chasing_answers():
    graph = pointer_graph(10, graph_seed=3)
    assert sorted(graph.tolist()) == list(range(10))
    tokens, targets, hops = pointer_chasing_batch(64, graph, max_hops=4, n_queries=5, generator=torch.Generator().manual_seed(0))
    start, k, answer = tokens[:, 0::3], tokens[:, 1::3] - 9, tokens[:, 2::3]
    assert torch.equal(targets[:, 1::3], answer) and torch.equal(hops[:, 1::3], k)
    assert ((targets == -100).sum(1) == 10).all()
    for b in range(4):
        for q in range(5):
            node = start[b, q].item()
            for _ in range(k[b, q].item()): node = graph[node].item()
            assert node == answer[b, q].item()
    assert set(k.flatten().tolist()) == {1, 2, 3, 4}


def test_exercises():
    ts = exercise_token_skip()
    assert ts["odd_change"] > 1e-4 and ts["even_change"] > 1e-4
    ste = exercise_ste_gradient()
    assert ste["router_grad"] > 0 and ste["max_abs_incoming"] > 1.0 and ste["max_abs_dw"] <= 1.0


def test_config_errors():
    for kw, msg in [(dict(router="lstm"), "router must be"), (dict(impl="cuda"), "impl must be"),
                    (dict(rounds=0), "pool_size and rounds"), (dict(temperature=0.0), "temperature"),
                    (dict(top_k=0), r"top_k must lie in \[1, 4\]"), (dict(pool_size=2, top_k=4), r"top_k must lie in \[1, 3\]"),
                    (dict(pool_size=2, skip=False, top_k=3), r"top_k must lie in \[1, 2\]")]:
        with pytest.raises(ValueError, match=msg):
            MoMConfig(**kw)


def test_benchmark_runs_every_provider():
    "The GPU benchmark's code path on CPU at a tiny shape with a one-shot timer (no timing claims): rows and summary."
    from lmcourse.mom import benchmark_summary, mom_benchmark
    calls = []
    def once(fn, grad_to_none=()):
        fn(); calls.append(1)
        return {"median": 1.0, "p20": 1.0, "p80": 1.0}
    result = mom_benchmark(dict(tokens=48, d_model=32, n_heads=2, pool_size=2, skip_rates=(0.0, 0.5)), torch.float32,
                           device=DEV, timer=once)
    assert len(result["rows"]) == len(calls) == 2 * 2 * 8                 # skip rates x modes x providers
    summary = benchmark_summary(result)
    assert {r["provider"] for r in summary} >= {"routed_linear (triton)", "MoM round (loop)", "dense Block"}


def test_benchmark_plot():
    import matplotlib
    matplotlib.use("Agg")
    from lmcourse.mom import plot_benchmark
    rows = [dict(what=w, provider=p, skip_rate=s, mode="fwd+bwd", ms=1.0 + s, roofline_ms=None)
            for w in ("linear", "round", "router") for p in ("a (triton)", "loop", "dense") for s in (0.0, 0.5)]
    fig = plot_benchmark({"shape": {"d_model": 8, "tokens": 16}, "rows": rows})
    assert len(fig.axes) == 3 and all(len(ax.lines) == 3 for ax in fig.axes)


def _gru_params(d, R, C, dtype=torch.float32):
    from lmcourse.mom import GRURouter
    router = GRURouter(d, C, R).to(DEV, dtype)
    return router, [router.cell.weight_ih, router.cell.bias_ih, router.cell.weight_hh, router.cell.bias_hh,
                    router.head.weight, router.head.bias]


@pytest.mark.gpu
@pytest.mark.parametrize("N,d,R,C", [(45, 80, 72, 4), (70, 136, 130, 9), (5, 16, 16, 2)])
def test_gru_router_step_vs_float64(tiles, N, d, R, C):
    "d and R span several blocks (32 on CPU, 64 in the GPU tiles); states of size ~3 so the gates saturate somewhere."
    from lmcourse.mom import GRURouterFunction, gru_router_reference
    (x, g), seed = random_tensors([(N, d), (N, R)], device=DEV, scale=3.0)
    _, params = _gru_params(d, R, C)
    params = [p.detach() * 4 for p in params]                          # larger than the default init: gates saturate
    check_against_reference(lambda x, g, *p: GRURouterFunction.apply(x, g, *p), gru_router_reference, [x, g, *params], seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_gru_router_module_fused_matches_unfused(dtype):
    from lmcourse.mom import gru_router_reference
    (x,), seed = random_tensors([(33, 48)], device=DEV, dtype=dtype)
    router, params = _gru_params(48, 40, 5, dtype)
    s1, g1 = router(x, None, fused=True)
    s2, g2 = router(x, g1, fused=True)                                 # the state carried to the next round
    zeros = torch.zeros(33, 40, dtype=torch.float64, device=DEV)
    r1, h1 = gru_router_reference(x.double(), zeros, *[p.double() for p in params])
    r2, _ = gru_router_reference(x.double(), h1, *[p.double() for p in params])
    for a, b, name in ((s1, r1, "scores 1"), (g1, h1, "state 1"), (s2, r2, "scores 2")):
        assert_close(a, b.to(dtype), tolerance(dtype, DEV), name=name, seed=seed)


def test_gru_router_bad_inputs():
    from lmcourse.mom import GRURouterFunction
    _, params = _gru_params(32, 16, 3)
    x, g = torch.zeros(4, 32, device=DEV), torch.zeros(4, 16, device=DEV)
    with pytest.raises(ValueError, match="shapes must be"):
        GRURouterFunction.apply(x[:, :8], g, *params)
    with pytest.raises(ValueError, match="share one dtype"):
        GRURouterFunction.apply(x.half(), g.half(), *params)
    _, wide = _gru_params(32, 16, 65)
    with pytest.raises(ValueError, match="at most 64 classes"):
        GRURouterFunction.apply(x, g, *wide)


def test_full_run_code_path_on_a_tiny_size():
    "depth_experiment end to end at a CPU size (3 steps per phase): every arm, the SKIP log and the removal ablation."
    from lmcourse.mom import depth_experiment
    size = dict(d_model=16, n_heads=2, d_ffn=32, n_nodes=6, max_hops=3, n_queries=2, batch_size=4, vanilla_steps=3,
                mom_steps=3, lr=1e-3, router_dim=8)
    r = depth_experiment(size, seed=0, device="cpu")
    arms = r["arms"]
    assert set(arms) == {"vanilla-8 continued", "MoM from vanilla-8", "vanilla-12"}
    assert arms["MoM from vanilla-8"]["params"] > arms["vanilla-8 continued"]["params"]        # + the routers
    assert arms["vanilla-12"]["params"] > arms["MoM from vanilla-8"]["params"]
    assert len(arms["MoM from vanilla-8"]["skip_per_round"]) == 8
    assert set(arms["MoM from vanilla-8"]["removal"]) == {"all", "no attention", "no FFN"}
    assert r["phase2_tokens"] == 3 * 4 * 6


def test_smoke_plot():
    import matplotlib
    matplotlib.use("Agg")
    from lmcourse.mom import plot_smoke
    run = {"seed": 0, "attn_share": [0.3, 0.3, 0.2, 0.2], "ffn_share": [0.25] * 4,
           **{a: {"loss": 1.0} for a in ("start", "vanilla", "mom", "vanilla_continued")}}
    fig = plot_smoke([run, dict(run, seed=1)])
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2


# ---- top-K routing ----

def test_route_top_k_picks_weights_and_ties():
    (s,), seed = random_tensors([(40, 6)], device="cpu", scale=2.0)
    print("seed", seed)
    for renormalize in (False, True):
        choice, w, p = route(s, 0.5, top_k=3, renormalize=renormalize)
        assert choice.shape == w.shape == (40, 3)
        assert torch.equal(choice, p.topk(3).indices)                              # no ties in a random draw
        expected = p.gather(1, choice)
        expected = expected / expected.sum(-1, keepdim=True) if renormalize else expected
        assert torch.equal(w, expected) and (w[:, :-1] >= w[:, 1:]).all()           # best first
    choice, w, _ = route(torch.zeros(2, 5), top_k=3)                                 # all tied: the lower classes, as argmax
    assert choice.tolist() == [[0, 1, 2]] * 2 and torch.allclose(w, torch.full((2, 3), 0.2))
    assert route(torch.zeros(2, 5))[0].tolist() == [[0], [0]]
    _, w, _ = route(s, 0.5, straight_through=True, top_k=2)
    assert (w == 1).all()
    for k in (0, 7):
        with pytest.raises(ValueError, match=r"top_k must lie in \[1, 6\]"):
            route(s, top_k=k)


def _released_chunk_reference(chunk: MoMChunk, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The released code's MoM rounds (mom/model.py, MLP router), written its way in float64: topk of the router's
    softmax, renormalised with a softmax router, a one-hot expert mask, per module `qkv[idx] +=` and `index_add_`
    of the weighted outputs; SKIP (the last class) is never a module. x [B, T, d] float64 -> [B, T, d]."""
    c = chunk.mcfg
    B, T, d = x.shape
    lead = chunk.pool[0].attn
    H, Hkv, D = lead.n_heads, lead.n_kv_heads, lead.head_dim
    x = x.reshape(B * T, d)
    def decide(router, x):
        probs = torch.softmax(router(x)[0] / c.temperature, dim=-1)
        top_score, top_ids = torch.topk(probs, c.top_k, dim=-1)
        if c.renormalize: top_score = top_score / top_score.sum(-1, keepdim=True)
        if c.straight_through: top_score = torch.ones_like(top_score)
        return top_score, torch.nn.functional.one_hot(top_ids, probs.shape[-1]).permute(2, 1, 0)
    for _ in range(c.rounds):
        top_score, mask = decide(chunk.attn_router, x)
        qkv = torch.zeros(B * T, (H + 2 * Hkv) * D, dtype=x.dtype)
        for j, blk in enumerate(chunk.pool):
            idx2, idx = torch.where(mask[j])
            w_qkv = torch.cat([blk.attn.q_proj.weight, blk.attn.k_proj.weight, blk.attn.v_proj.weight])
            qkv[idx] += blk.attn_norm(x[idx]) @ w_qkv.t()
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in qkv.split([H * D, Hkv * D, Hkv * D], -1))
        q, k = lead.positional(q, k, positions)
        z = lead.attend(q, k, v).transpose(1, 2).reshape(B * T, H * D)
        out = torch.zeros_like(x)
        for j, blk in enumerate(chunk.pool):
            idx2, idx = torch.where(mask[j])
            out.index_add_(0, idx, (z[idx] @ blk.attn.o_proj.weight.t()) * top_score[idx, idx2, None])
        x = x + out
        top_score, mask = decide(chunk.ffn_router, x)
        out = torch.zeros_like(x)
        for j, blk in enumerate(chunk.pool):
            idx2, idx = torch.where(mask[j])
            out.index_add_(0, idx, blk.ffn(blk.ffn_norm(x[idx])) * top_score[idx, idx2, None])
        x = x + out
    return x.view(B, T, d)


@pytest.mark.parametrize("renormalize,ste", [(False, False), (True, False), (False, True)])
def test_top_k_with_skip_vs_released_loop(renormalize, ste):
    "K = 2 of 3 modules + SKIP, routed (not forced), two rounds: the loop and the kernel path vs the released code's scheme."
    (x,), seed = random_tensors([(2, 19, 32)], device="cpu")
    print("seed", seed)
    torch.manual_seed(seed)
    cfg = _cfg(3, n_kv_heads=1)
    mcfg = MoMConfig(n_bottom=0, pool_size=3, rounds=2, n_top=0, router_dim=16, temperature=1.0, top_k=2,
                     renormalize=renormalize, straight_through=ste, impl="torch")
    chunk = MoMChunk(cfg, mcfg, list(Transformer(cfg).blocks)).eval()
    with torch.no_grad():
        for router in (chunk.attn_router, chunk.ffn_router):
            router.net[0].weight.normal_(0, 1.0)                       # decisions that differ between tokens
            s = router(x.reshape(-1, 32))[0]                           # SKIP's bias: in the top 2 for about half the tokens
            router.net[2].bias[-1] += (s[:, :-1].topk(2).values[:, 1] - s[:, -1]).median() + 0.01
    positions = torch.arange(19)
    with torch.no_grad():
        ref = _released_chunk_reference(copy.deepcopy(chunk).double(), x.double(), positions)
        loop = copy.deepcopy(chunk).double()(x.double(), positions)
        assert rel_error(loop, ref) < 1e-6                              # the engine's RMSNorm computes in fp32
        chunk.mcfg = replace(mcfg, impl="triton")
        kernel = chunk(x, positions)
        assert rel_error(kernel, ref) < 1e-5
    for counts in (chunk.attn_counts, chunk.ffn_counts):                # [rounds, 3 modules + SKIP]
        assert (counts.sum(1) == 2 * 38).all() and ((counts > 0).sum(1) >= 3).all(), counts   # tokens disagree
        assert (counts[:, -1] > 0).all() and (counts[:, -1] < 38).all(), counts              # some tokens pick SKIP
    assert (chunk.attn_skipped == 0).all()                            # two distinct picks: never only SKIP


@pytest.mark.parametrize("router", ["mlp", "gru"])
def test_top_k_kernel_gradients_vs_float64_loop(router):
    "The kernel path in fp32 (interpreter) against the per-module loop in float64: logits and every gradient, K = 2 with SKIP."
    torch.manual_seed(0)
    mom = mom_model(_cfg(1), MoMConfig(n_bottom=1, pool_size=3, rounds=2, n_top=1, router=router, router_dim=16,
                                       temperature=1.0, top_k=2, impl="triton"))
    mom.embed_tokens.weight.data *= 50                                # residual std ≈ 1: decisions differ between tokens
    tokens = torch.randint(0, 48, (2, 11))
    ref = copy.deepcopy(mom).double()
    mom_chunk(ref).mcfg = replace(mom_chunk(mom).mcfg, impl="torch")
    out = {}
    for name, m in (("kernel", mom), ("loop64", ref)):
        logits, _ = m(tokens)
        logits.pow(2).mean().backward()
        out[name] = (logits.detach(), {n: p.grad for n, p in m.named_parameters()})
    (l32, g32), (l64, g64) = out["kernel"], out["loop64"]
    for counts in (mom_chunk(mom).attn_counts, mom_chunk(mom).ffn_counts):
        assert (counts[:, -1] > 0).all() and (counts > 0).sum() > 4       # SKIP among the picks, and more than 2 classes
    assert rel_error(l32, l64) < 1e-5
    assert all(g32[n] is not None and rel_error(g32[n], g64[n]) < 1e-4 for n in g64), \
        {n: rel_error(g32[n], g64[n]) for n in g64}


@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (2, True), (3, True)])
def test_separate_pools_with_ffn_top_k_are_moe(top_k, renormalize):
    "mom_moe (L chunks of one round, attention identity-routed, FFN top-K of E) equals an independent MoE transformer."
    seed = torch.seed() % 2 ** 31
    print("seed", seed)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=2, d_ffn=40, max_seq_len=32)
    moe = mom_moe(cfg, n_experts=4, top_k=top_k, renormalize=renormalize, router_dim=16, temperature=1.0, impl="torch").eval()
    for chunk in moe.blocks:
        chunk.ffn_router.net[0].weight.data.normal_(0, 10.0)          # the embeddings are small (std 0.02)
    tokens = torch.randint(0, 48, (2, 9))
    ref = moe_reference(moe, tokens)
    with torch.no_grad():
        assert rel_error(copy.deepcopy(moe).double()(tokens)[0], ref) < 1e-6
        for chunk in moe.blocks: chunk.mcfg = replace(chunk.mcfg, impl="triton")
        assert rel_error(moe(tokens)[0], ref) < 1e-5
    picks = torch.stack([chunk.ffn_counts[0] for chunk in moe.blocks])
    assert (picks.sum(1) == top_k * 18).all() and (picks > 0).sum() > top_k * 2   # the tokens disagree
    assert all((chunk.attn_counts[0, 1:] == 0).all() for chunk in moe.blocks)     # attention: module 0 only
    assert len(moe.blocks) == 2


def test_moe_model_trains_with_aux_loss_from_the_ffn_router():
    torch.manual_seed(0)
    moe = mom_moe(_cfg(2), n_experts=3, top_k=2, router_dim=16, impl="torch").train()
    tokens = torch.randint(0, 48, (2, 10))
    _, loss = moe(tokens, tokens)
    for chunk in moe.blocks:
        assert chunk.balance_losses[0] is None and chunk.balance_losses[1] > 0 and chunk.aux_loss > 0
    loss.backward()
    chunk = moe.blocks[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in chunk.ffn_router.parameters())
    assert all(p.grad is None for p in chunk.attn_router.parameters())        # forced: never used
    assert all(p.grad is not None for p in chunk.pool[1].ffn.parameters())   # experts 1.. are used by the FFN
    assert all(p.grad is None or (p.grad == 0).all() for p in chunk.pool[1].attn.parameters())   # nor their attention


def test_top_k_bad_input():
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, 4\]"):
        mom_moe(_cfg(1), n_experts=4, top_k=5)
    mom = mom_model(_cfg(1), MoMConfig(n_bottom=0, pool_size=3, rounds=1, n_top=0, top_k=3, router_dim=8))
    mom_chunk(mom).removed_modules = ((0, 1), ())
    with pytest.raises(ValueError, match="top_k = 3 picks, but only 2 choices remain"):
        mom(torch.randint(0, 48, (1, 4)))
    mom_chunk(mom).removed_modules = ((0,), ())
    mom(torch.randint(0, 48, (1, 4)))                                              # 3 of 3 remaining: fine
    assert mom_chunk(mom).attn_counts[:, 0].sum() == 0
