"""Tests of `lmcourse.pear`: the proxy task, the Triton kernels (interpreter on CPU) against float64 references at CPU
and GPU tile shapes (their sm_90 / sm_80 compile is tests/test_gpu_compile.py's, from `compile_cases`), folding, the
coefficient layers, the pre-screen, the planted-head experiment over three seeds, and the RAG run's pipeline at toy
sizes. Tests marked `gpu` are the kernel checks `make gpu` runs on a GPU in every dtype."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import json

import pytest
import torch

from lmcourse.data import IGNORE_INDEX, knowledge_base
from lmcourse.interp import PathPatching, minus_mean_weights, read_directions
from lmcourse.model import ModelConfig, Transformer, patch
from lmcourse.pear import (GPU_CONFIGS, LearnedPositions, attach_pear, compare_backends, copy_accuracy,
                           copy_metric, detach_pear, dla_prescreen, dla_prescreen_ref, fold_pear, head_scaled_linear,
                           head_scaled_linear_einsum, head_scaled_linear_ref, head_scaled_linear_short,
                           pear_coefficients, planted_head_experiment, prescreen_scores, proxy_task, rag_config,
                           rag_episodes, rag_run, rag_vocab, suppression_scores, top_heads, train_coefficients)
from lmcourse.testing import (check_against_reference, fresh_seed, kernel_device, kernel_dtypes, random_tensors,
                              rel_error, tolerance)

DEVICE = kernel_device()


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models on a CPU: one thread (more only wait for each other when the suite runs in parallel)."
    before = torch.get_num_threads()
    if DEVICE.type == "cpu": torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def elementwise_ok(actual, expected, tol):
    "The worst element against the reference's scale (norm-wise error hides a wrong last row)."
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite output (poison not overwritten?)"
    worst = (a - e).abs().max().item() / e.abs().max().item()
    assert worst <= 4 * tol, f"element-wise error {worst:.2e} > 4 x {tol:.1e}"


def check_projection(N, d, H, D, dtype=torch.float32, bias=False, transposed=False, config=None, z_grad=True, seed=None):
    (z, w, b, tau), seed = random_tensors([(N, H * D), (d, H * D), (d,), (H,)], dtype, DEVICE, seed)
    if transposed: w = w.T.contiguous().T
    tau = tau.float().abs() + 0.25
    tol = tolerance(dtype, DEVICE)
    fn = lambda z, tau: head_scaled_linear(z, w, tau, b if bias else None, config=config)
    ref = lambda z, tau: head_scaled_linear_ref(z, w.double(), tau, b.double() if bias else None)
    if not z_grad:                                   # only τ needs a gradient: the kernel skips dz
        tau_ = tau.clone().requires_grad_()
        out = fn(z, tau_)
        g = torch.randn_like(out)
        (dtau,) = torch.autograd.grad(out, tau_, g)
        tau64 = tau.double().requires_grad_()
        (want,) = torch.autograd.grad(ref(z.double(), tau64), tau64, g.double())
        assert rel_error(dtau, want) <= 2 * tol, (rel_error(dtau, want), seed)
        return
    errors = check_against_reference(fn, ref, [z, tau], grad_tol=2 * tol, seed=seed)
    out, want = fn(z, tau), ref(z.double(), tau.double())
    elementwise_ok(out, want, tol)
    return errors


# -- the proxy task -----------------------------------------------------------------------------------------------
def test_proxy_task_layout_and_targets():
    b = proxy_task(5, 7, vocab_size=40, seed=fresh_seed())
    assert b.inputs.shape == (5, 14) and (b.inputs[:, 0] == 0).all()
    assert torch.equal(b.inputs[:, 1:7], b.inputs[:, 8:14]) and torch.equal(b.targets[:, -1], b.inputs[:, 7])
    # distinct content ids >= 3
    assert all(len(set(row.tolist())) == 7 for row in b.inputs[:, 1:8]) and b.inputs[:, 1:].min() >= 3
    targets = b.targets != IGNORE_INDEX
    assert targets[:, :8].sum() == 0 and targets[:, 8:].all()            # x₂ … xₙ of the second copy only
    assert torch.equal(b.targets[:, 8:], b.inputs[:, 2:8])
    assert torch.equal(b.info["position"], torch.full((5,), 13))
    no_bos = proxy_task(5, 7, vocab_size=40, seed=1, bos_id=None)
    assert torch.equal(no_bos.inputs, proxy_task(5, 7, vocab_size=40, seed=1).inputs[:, 1:])
    assert (proxy_task(2, 3, vocab_size=40, bos_id=17).inputs[:, 0] == 17).all()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        proxy_task(2, 1, vocab_size=40)


# -- kernels ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE))
@pytest.mark.parametrize("shape", [dict(N=77, d=100, H=5, D=24),          # a K step straddles heads; ragged everywhere
                                   dict(N=130, d=70, H=4, D=16, bias=True),
                                   dict(N=50, d=90, H=3, D=40, transposed=True),
                                   dict(N=1, d=33, H=2, D=8),              # one row, tiny heads
                                   dict(N=96, d=64, H=8, D=8, bias=True, transposed=True)])
def test_head_scaled_linear_matches_float64(shape, dtype):
    check_projection(dtype=dtype, **shape)


@pytest.mark.parametrize("index", range(max(len(GPU_CONFIGS["forward"]), len(GPU_CONFIGS["backward"]))))
def test_head_scaled_linear_at_gpu_tile_shapes(index):
    """Forward config `index` and backward config `index` (modulo their counts) in the interpreter, on a problem at least
    two tiles long in every dimension of both: rows, d (forward columns, backward reduction), K (forward reduction,
    backward columns; 16-channel heads so tiles straddle heads)."""
    fwd = GPU_CONFIGS["forward"][index % len(GPU_CONFIGS["forward"])].kwargs
    bwd = GPU_CONFIGS["backward"][index % len(GPU_CONFIGS["backward"])].kwargs
    rows = 2 * max(fwd["BLOCK_M"], bwd["BLOCK_M"]) + 7
    d = 2 * max(fwd["BLOCK_N"], bwd["BLOCK_J"]) + 5
    heads = (2 * max(fwd["BLOCK_K"], bwd["BLOCK_K"]) + 16) // 16
    check_projection(rows, d, heads, 16, bias=True, config=index)


@pytest.mark.gpu
def test_zero_and_negative_coefficients():
    "A head switched off (τ = 0) or inverted (τ < 0): its dz is exactly 0 or flipped, and dτ is still its gradient."
    (z, w), seed = random_tensors([(70, 5 * 24), (50, 5 * 24)], device=DEVICE)
    tau = torch.tensor([0.0, -1.5, 1.0, 0.0, 2.5], device=DEVICE)
    check_against_reference(lambda z, t: head_scaled_linear(z, w, t), lambda z, t: head_scaled_linear_ref(z, w.double(), t),
                            [z, tau], seed=seed)
    z_ = z.clone().requires_grad_()
    head_scaled_linear(z_, w, tau).sum().backward()
    assert (z_.grad[:, :24] == 0).all() and (z_.grad[:, 72:96] == 0).all()


@pytest.mark.gpu
def test_coefficient_gradient_alone_skips_dz():
    check_projection(130, 70, 4, 16, z_grad=False)


@pytest.mark.gpu
def test_short_kernel():
    (z, w), seed = random_tensors([(45, 48), (70, 48)], device=DEVICE)
    tau = torch.rand(3, device=DEVICE) + 0.5
    out = head_scaled_linear_short(z, w, tau)
    want = head_scaled_linear_ref(z.double(), w.double(), tau.double())
    assert rel_error(out, want) <= tolerance(torch.float32, DEVICE), seed
    elementwise_ok(out, want, tolerance(torch.float32, DEVICE))
    with pytest.raises(ValueError, match="power of 2"):
        head_scaled_linear_short(z[:, :40], w[:, :40], torch.ones(4, device=DEVICE))


def test_released_einsum_form_equals_reference():
    z, w = torch.randn(3, 5, 4 * 6, dtype=torch.float64), torch.randn(9, 24, dtype=torch.float64)
    tau, b = torch.rand(4, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    assert torch.allclose(head_scaled_linear_einsum(z, w, tau, b), head_scaled_linear_ref(z, w, tau, b), atol=1e-12)


def test_head_scaled_linear_errors():
    (z, w), _ = random_tensors([(8, 64), (32, 64)], device=DEVICE)
    tau = torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="float32 vector"):
        head_scaled_linear(z, w, tau.half())
    with pytest.raises(ValueError, match=r"\[d, H·D\]"):
        head_scaled_linear(z, w.T, tau)
    with pytest.raises(ValueError, match="whole number of heads"):
        head_scaled_linear(z, w, torch.ones(6, device=DEVICE))
    with pytest.raises(ValueError, match="share a dtype"):
        head_scaled_linear(z, w.half(), tau)
    with pytest.raises(ValueError, match="bias must be"):
        head_scaled_linear(z, w, tau, torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="must be frozen"):
        head_scaled_linear(z, w.clone().requires_grad_(), tau)
    with pytest.raises(ValueError, match="supports float32"):
        head_scaled_linear(z.double(), w.double(), tau)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="interpreter"):
            head_scaled_linear(z.bfloat16(), w.bfloat16(), tau)
        with pytest.raises(ValueError, match="runs on CUDA"):
            head_scaled_linear(z.to("meta"), w.to("meta"), tau.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, *range(len(GPU_CONFIGS["prescreen"]))])
def test_prescreen_kernel_matches_float64(config):
    R, H, D = (37, 5, 24) if config is None else (2 * GPU_CONFIGS["prescreen"][config].kwargs["BLOCK_R"] + 3, 3, 40)
    d = 100 if config is None else 3 * GPU_CONFIGS["prescreen"][config].kwargs["BLOCK_J"] + 9   # several d tiles
    (z, w, rho, per_row), seed = random_tensors([(R, H * D), (d, H * D), (R, d), (R, H * D)], device=DEVICE)
    for mean_z in (z.mean(0, keepdim=True), per_row):
        got = dla_prescreen(z, mean_z, rho, w, H, config=config)
        want = dla_prescreen_ref(z.double(), mean_z.double(), rho.double(), w.double(), H)
        assert rel_error(got, want) <= tolerance(torch.float32, DEVICE), seed
        elementwise_ok(got, want, tolerance(torch.float32, DEVICE))
    with pytest.raises(ValueError, match="shapes do not fit"):
        dla_prescreen(z, mean_z[:, :-1], rho, w, H)


# -- folding and the coefficient layers -------------------------------------------------------------------------------
def lm(n_kv_heads=4, n_layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=64)
    return Transformer(cfg).eval().requires_grad_(False)


def reweighted(model, tau, tokens):
    "The reference: every head's hook_z scaled by its coefficient."
    edits = {f"blocks.{l}.attn.hook_z": (lambda z, l=l: z * tau[l][:, None].to(z.dtype)) for l in range(len(tau))}
    with patch(model, edits):
        return model(tokens)[0]


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_fold_is_exact_for_mha_and_gqa(n_kv_heads):
    model = lm(n_kv_heads, n_layers=3)
    tokens = torch.randint(3, 64, (2, 19))
    tau = torch.rand(3, 4) * 2
    want = reweighted(model, tau, tokens)
    params, flops = model.num_params(), model.flops_per_token(19)
    fold_pear(model, tau)
    assert torch.allclose(model(tokens)[0], want, atol=1e-5)
    assert (model.num_params(), model.flops_per_token(19)) == (params, flops)
    with pytest.raises(ValueError, match="one per query head"):
        fold_pear(model, torch.ones(3, n_kv_heads if n_kv_heads != 4 else 2))


def test_attach_detach_roundtrip_and_kernel_equals_reference():
    model = lm(2)
    tokens = proxy_task(3, 9, vocab_size=64)
    plain = model(tokens.inputs)[0]
    layers = attach_pear(model, [(0, 3), (1, 0), (1, 2)], backend="triton")
    assert [l.coefficients.dtype for l in layers] == [torch.float32] * 2
    assert torch.allclose(model(tokens.inputs)[0], plain, atol=1e-5)       # τ = 1: the model unchanged
    with torch.no_grad():
        layers[0].coefficients.fill_(0.3); layers[1].coefficients.copy_(torch.tensor([1.4, 0.6]))
    tau = pear_coefficients(model)
    assert tau[0, 3] == pytest.approx(0.3) and tau[1, 2] == pytest.approx(0.6) and tau[0, 0] == 1
    check = compare_backends(model, tokens)
    assert torch.allclose(*check["logits"], atol=1e-5)
    for kernel, reference in check["grads"]:
        assert torch.allclose(kernel, reference, atol=1e-6) and kernel.abs().sum() > 0
    with pytest.raises(ValueError, match="already has a PearOutput"):
        attach_pear(model, [(0, 1)])
    with pytest.raises(ValueError, match="detach_pear"):
        fold_pear(model, tau)
    detach_pear(model, fold=False)
    assert torch.equal(model(tokens.inputs)[0], plain)                     # the originals back, unchanged
    folded = lm(2)
    for layer, index in zip(attach_pear(folded, [(0, 3), (1, 0), (1, 2)]), (0, 1)):
        with torch.no_grad(): layer.coefficients.copy_(tau[index][layer.heads])
    detach_pear(folded)
    assert torch.allclose(folded(tokens.inputs)[0], reweighted(lm(2), tau, tokens.inputs), atol=1e-5)


def test_attach_errors():
    model = lm()
    with pytest.raises(ValueError, match="outside the model"):
        attach_pear(model, [(2, 0)])
    with pytest.raises(ValueError, match="backend must be"):
        attach_pear(model, [(0, 0)], backend="cuda")


def test_train_coefficients_changes_only_the_coefficients():
    model = lm(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train_coefficients(model, [(1, 1), (0, 2)], vocab_size=64, n=8, steps=5, batch_size=4, lr=5e-2,
                                 device="cpu")
    assert len(history.train_loss) >= 1
    tau = pear_coefficients(model)
    assert tau[1, 1] != 1 and tau[0, 2] != 1 and tau[0, 0] == 1
    coefficients = detach_pear(model, fold=False)
    assert torch.equal(coefficients, tau)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert 0 <= copy_accuracy(model, 8, vocab_size=64, n_seqs=16) <= 1


# -- detection and the pre-screen ---------------------------------------------------------------------------------------
def test_prescreen_is_fully_frozen_path_patching():
    "Per setting, the pre-screen equals path patching with the MLPs and the final norm's scale frozen."
    model = lm(2, seed=3)
    settings = ((12, 7),)
    batch = proxy_task(12, 7, vocab_size=64, seed=5)
    pos = batch.info["position"]
    _, acts = model.run_with_cache(batch.inputs, ["norm.hook_scale"])
    with patch(model, {"norm.hook_scale": lambda s: acts["norm.hook_scale"].repeat(len(s) // 12, 1, 1)}):
        exact = PathPatching(model, batch.inputs, positions=pos, freeze_mlps=True).scores(copy_metric(batch))
    for backend in ("reference", "triton"):
        screen = prescreen_scores(model, vocab_size=64, settings=settings, seed=5, backend=backend)
        assert torch.allclose(screen.flatten(), exact, atol=2e-5, rtol=1e-3), (backend, screen, exact)
    rho = read_directions(model, minus_mean_weights(batch.targets[:, -1], 64), acts["norm.hook_scale"][torch.arange(12), pos])
    assert rho.shape == (12, 64)


def test_suppression_scores_and_top_heads():
    model = lm(2)
    scores = suppression_scores(model, vocab_size=64, settings=((6, 5), (8, 4)))
    assert scores.shape == (2, 4) and torch.isfinite(scores).all()
    some = suppression_scores(model, vocab_size=64, settings=((6, 5), (8, 4)), heads=[(1, 2), (0, 0)])
    assert torch.allclose(some[1, 2], scores[1, 2]) and torch.allclose(some[0, 0], scores[0, 0])
    assert torch.isinf(some[0, 1])
    assert top_heads(torch.tensor([[0.5, -1.0], [2.0, 0.1]]), 3) == [(1, 0), (0, 0), (1, 1)]
    assert top_heads(torch.tensor([[-0.5, -1.0]]), 2) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_head_is_found_and_damped(seed):
    toy = planted_head_experiment(seed)
    assert toy["rank"] == 0 and toy["prescreen_rank"] == 0, (toy["scores"], toy["prescreen"], toy["planted"])
    assert toy["prescreen_top"] == [toy["planted"]]
    assert toy["coefficients"][toy["planted"]] < 0.5, toy["coefficients"]
    acc = toy["accuracy"]
    assert acc["trained"] > 0.95 and acc["planted"] < 0.6, acc
    assert acc["re-weighted"] > acc["planted"] + 0.3 and acc["folded"] == acc["re-weighted"], acc
    assert toy["fold_error"] < 1e-4


# -- the RAG run -------------------------------------------------------------------------------------------------------
def test_rag_episodes():
    kb = knowledge_base(n_subjects=15, n_relations=3, n_objects=8)
    vocab = rag_vocab(kb)
    b = rag_episodes(40, kb, vocab, n_docs=4, conflict=0.5, seq_len=80, seed=3)
    rows = torch.arange(40)
    assert torch.equal(b.targets[rows, b.info["answer_pos"]], b.info["answer"])
    assert 0 < b.info["conflict"].float().mean() < 1 and set(b.info["gold"].tolist()) <= set(range(4))
    for i in range(40):
        docs = vocab.decode(b.inputs[i].tolist()).split(" question : ")[0].split(" doc : ")[1:]
        assert len(docs) == 4
        gold = docs[int(b.info["gold"][i])]
        answer = vocab.words[int(b.info["answer"][i])]
        assert answer in gold.split()                                    # the gold document states the answer
        s = kb.subjects.index(next(w for w in gold.split() if w in kb.subjects))
        r = int(b.info["relation"][i])
        kb_answer = kb.objects[r][int(kb.table[s, r])]
        assert (answer != kb_answer) == bool(b.info["conflict"][i])      # conflict = contradicts the KB
    with pytest.raises(ValueError, match="raise seq_len"):
        rag_episodes(2, kb, vocab, n_docs=4, seq_len=20)


def test_learned_positions_model():
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    m = LearnedPositions(cfg).eval()
    x = torch.randint(3, 32, (1, 8))
    out = m(x)[0]
    with torch.no_grad(): m.pos_embed.weight.zero_()
    assert not torch.allclose(m(x)[0], out)                              # positions enter through the embedding only


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_rag_run_pipeline_at_toy_sizes(positions):
    result = rag_run(positions, rag_config(), seed=0, device="cpu")
    for when in ("before", "after"):
        acc = result[when]["accuracy"]
        assert set(acc) == {"all", "conflict", "consistent", "by_position", "by_position_conflict"}
        assert len(acc["by_position"]) == result["n_docs"] and 0 <= acc["all"] <= 1
        assert result[when]["tokens_per_s"] > 0 and 0 <= result[when]["proxy_accuracy"] <= 1
    assert len(result["coefficients"]) == result["model"]["n_layers"]
    json.dumps(result)                                                   # what save_result stores
    with pytest.raises(ValueError, match="rope' or 'learned"):
        rag_run("alibi")


# -- GPU only ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU (the interpreter computes it wrongly)")
@pytest.mark.parametrize("shape", [dict(N=4096, d=4096, H=32, D=128), dict(N=1000, d=1536, H=12, D=128, bias=True),
                                   dict(N=777, d=1000, H=10, D=80)])
def test_bf16_on_gpu(shape):
    check_projection(dtype=torch.bfloat16, **shape)
