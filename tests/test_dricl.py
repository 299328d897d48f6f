"""Tests of `lmcourse.dricl`: the benchmark generator, the zero-shot segments against the released mask, exact
isolation, the objective against an independent reference, the paper's and the released weights (pinned trace),
the fused-kernel backend against the reference, and the Hugging Face adapter."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import math
import random

import pytest
import torch

from lmcourse.data import IGNORE_INDEX
from lmcourse.dricl import (EOA, FAMILIES, IN, N_SYMBOLS, SYMBOL0, VOCAB_SIZE, DrICLConfig, answer_runs, demo_weights,
                            dricl_hf_loss, dricl_loss, dricl_objective, episode, episode_batch, hf_zero_shot_mask,
                            many_shot_benchmark, max_shots, official_demo_weights, shot_accuracy, token_losses,
                            zero_shot_segments)
from lmcourse.model import ModelConfig, Transformer, attention_mask
from lmcourse.testing import assert_close, fresh_seed

BENCH = many_shot_benchmark()


def _model(d=32, layers=2, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB_SIZE, d_model=d, n_layers=layers, n_heads=2, max_seq_len=256))


# -- the benchmark --------------------------------------------------------------------------------------------
def test_benchmark_structure_and_answers():
    assert len(BENCH.in_domain) == 40 and len(BENCH.held_out) == 10
    assert {t.family for t in BENCH.held_out} == set(FAMILIES) and not any(t.named for t in BENCH.held_out)
    assert sum(t.named for t in BENCH.in_domain) == 20
    assert len({t.index for t in BENCH.in_domain + BENCH.held_out}) == 50
    rng = random.Random(fresh_seed())
    for task in BENCH.in_domain + BENCH.held_out:
        toks, mask, xs, ys = episode(task, 7, rng)
        assert ys == [task.answer(x) for x in xs]
        assert all(0 <= t < VOCAB_SIZE for t in toks) and len(toks) == 3 + 7 * ((len(toks) - 3) // 7)
        assert sum(mask) == sum(len(y) + 1 for y in ys)
    t = next(t for t in BENCH.in_domain if t.family == "transform" and t.params[0] == 0)
    assert t.answer((1, 2, 3)) == (3, 2, 1)
    assert 200 <= min(max_shots(t, 2048) for t in BENCH.in_domain) <= max(max_shots(t, 2048) for t in BENCH.in_domain) <= 410


def test_label_noise_rate_and_clean_query():
    task = BENCH.in_domain[0]
    rng = random.Random(fresh_seed())
    noisy = total = 0
    for _ in range(50):
        _, _, xs, ys = episode(task, 60, rng, noise=0.3)
        assert ys[-1] == task.answer(xs[-1])                        # the query stays clean
        noisy += sum(y != task.answer(x) for x, y in zip(xs[:-1], ys[:-1])); total += 59
    assert 0.22 < noisy / total < 0.32                               # 0.3 × (1 − 1/#labels)


def test_episode_batch_targets():
    b = episode_batch(BENCH.in_domain, 5, 150, torch.Generator().manual_seed(fresh_seed()), noise=0.2)
    assert b.inputs.shape == b.targets.shape == (5, 150)
    on = b.targets != IGNORE_INDEX
    assert on.any(1).all()
    assert torch.equal(b.inputs[:, 1:][on[:, :-1]], b.targets[:, :-1][on[:, :-1]])   # targets are the next tokens


# -- the zero-shot pass ---------------------------------------------------------------------------------------
def _released_mask(labels):
    B, T = labels.shape
    mask = torch.zeros(B, T, T)
    for b in range(B):
        idx = torch.nonzero(labels[b] > -100).flatten().tolist()
        ends = [i for j, i in enumerate(idx) if j + 1 == len(idx) or idx[j + 1] != i + 1]
        for e0, e1 in zip(ends, ends[1:]):
            for j in range(e0, e1):
                mask[b, j + 1, :e0 + 1] = float("-inf")
    return mask


@pytest.mark.parametrize("trial", range(3))
def test_zero_shot_segments_match_the_released_mask(trial):
    b = episode_batch(BENCH.in_domain, 3, 120, torch.Generator().manual_seed(fresh_seed()), noise=0.2)
    labels = torch.cat([torch.full_like(b.targets[:, :1], -100), b.targets[:, :-1]], 1)
    released = (_released_mask(labels) == 0) & torch.ones(120, 120, dtype=torch.bool).tril()
    ours = attention_mask(120, 120, causal=True, segment_ids=zero_shot_segments(b.targets))[:, 0]
    answered = (labels > -100).flip(1).cumsum(1).flip(1) > 0
    assert torch.equal(ours[answered], released[answered])


def test_answer_runs():
    t = torch.tensor([[-100, 5, 6, -100, -100, 7, -100, 8, 9]])
    assert answer_runs(t).tolist() == [[-1, 0, 0, -1, -1, 1, -1, 2, 2]]
    assert zero_shot_segments(t).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2]]


def test_zero_shot_pass_isolates_demonstrations_exactly():
    model = _model()
    while True:   # a batch whose segments 1-3 each hold symbols to perturb (a few % of draws have a segment without)
        b = episode_batch(BENCH.in_domain, 2, 120, torch.Generator().manual_seed(fresh_seed()))
        seg = zero_shot_segments(b.targets)
        if all(((seg == j) & (b.inputs >= SYMBOL0)).any() for j in range(1, 4)):
            break
    with torch.no_grad():
        logits = model(b.inputs, segment_ids=seg)[0]
        for j in range(1, 4):
            p = b.inputs.clone()
            inside = (seg == j) & (b.inputs >= SYMBOL0)
            p[inside] = SYMBOL0 + (p[inside] - SYMBOL0 + 1 + j) % N_SYMBOLS
            out = model(p, segment_ids=seg)[0]
            assert torch.equal(out[seg != j], logits[seg != j])
            assert not torch.equal(out[seg == j], logits[seg == j])


# -- the weights ----------------------------------------------------------------------------------------------
def test_official_weights_pinned_small_case():
    w = official_demo_weights([1.0, 2.0, 0.5])
    assert torch.allclose(w, torch.tensor([1.0, math.exp(1 / 11), math.exp(-1.5 / 11)], dtype=torch.float64), atol=1e-7)


def test_official_weights_pinned_35_trace():
    losses = torch.tensor([1.30, 0.42, 2.75, 1.01, 0.66, 1.88, 0.93, 2.10, 0.57, 1.44, 0.81, 2.33, 1.12, 0.49, 1.76,
                           2.91, 0.38, 1.05, 1.63, 0.72, 2.47, 0.95, 1.21, 0.33, 2.06, 1.57, 0.88, 1.99, 0.61, 1.34,
                           2.62, 0.77, 1.48, 0.54, 2.18])
    w, trace = official_demo_weights(losses, return_trace=True)
    assert trace == ["none"] + ["previous"] * 9 + [list(range(10, k + 1)) for k in range(10, 20)] + [[20]] + ["previous"] * 14
    f = losses.float()
    expected = [1.0]
    for k in range(1, 35):
        if k in (10, 20): b = f[k]
        elif 11 <= k <= 19: b = f[10:k + 1].max()
        else: b = f[k - 1]
        expected.append(math.exp(float((f[k] - b) / 11)))
    assert torch.equal(w, torch.tensor(expected, dtype=torch.float64))
    assert w[10] == 1.0 and w[20] == 1.0 and (w[11:20] <= 1.0).all()
    assert abs(w[2] - math.exp((2.75 - 0.42) / 11)) < 1e-6                # hard-coded: previous-loss baseline
    assert abs(w[15] - 1.0) < 1e-12                                        # 2.91 is the max of 10..15: its own baseline
    assert abs(w[14] - math.exp((1.76 - 2.33) / 11)) < 1e-6                # max of 10..14 is ℓ11 = 2.33


def test_official_weights_without_window_use_the_running_max():
    losses = torch.tensor([1.0, 3.0, 2.0, 0.5])
    w = official_demo_weights(losses, window=None)
    assert torch.allclose(w, torch.tensor([1.0, 1.0, math.exp(-1 / 11), math.exp(-2.5 / 11)], dtype=torch.float64), atol=1e-7)


def test_paper_weights():
    g = torch.Generator().manual_seed(fresh_seed())
    losses = torch.rand(47, generator=g) * 4
    for window, samples in ((10, 1), (5, 2), (7, 3)):
        w = demo_weights(losses, window=window, samples=samples)
        assert torch.equal(w[:window], torch.ones(window))
        for k in range(window, 47):
            prev = losses[(k // window - 1) * window:(k // window) * window]
            b = prev.sort().values[-samples:].mean()
            assert abs(w[k] - math.exp((losses[k] - b) / 11)) < 1e-5
        assert torch.allclose(demo_weights(losses, window=window, samples=samples, sign=-1.0)[window:], 1 / w[window:], rtol=1e-5)
    assert torch.equal(demo_weights(losses, gamma=math.inf), torch.ones(47))
    with pytest.raises(ValueError, match="samples"):
        demo_weights(losses, window=3, samples=4)
    with pytest.raises(ValueError, match="sign"):
        demo_weights(losses, sign=0.5)


def test_config_errors():
    with pytest.raises(ValueError, match="alpha"):
        DrICLConfig(alpha=2.0)
    with pytest.raises(ValueError, match="weights"):
        DrICLConfig(weights="cumulative")
    with pytest.raises(ValueError, match="backend"):
        DrICLConfig(backend="cuda")


# -- the objective ----------------------------------------------------------------------------------------------
def _reference(model, batch, alpha, weight_fn):
    ms = token_losses(model(batch.inputs)[0], batch.targets)
    zs = token_losses(model(batch.inputs, segment_ids=zero_shot_segments(batch.targets))[0], batch.targets)
    runs, rows = answer_runs(batch.targets), []
    for b in range(len(batch.targets)):
        ell = torch.stack([ms[b][runs[b] == k].mean() for k in range(int(runs[b].max()) + 1)])
        rows.append((weight_fn(ell.detach()) * ell).mean())
    l_ms, l_zs = torch.stack(rows).mean(), zs[batch.targets != IGNORE_INDEX].mean()
    return 0.5 * ((1 + alpha) * l_ms + (1 - alpha) * l_zs), l_ms, l_zs


@pytest.mark.parametrize("cfg", [DrICLConfig(alpha=0.0, weights="none"), DrICLConfig(window=3),
                                 DrICLConfig(alpha=0.5, window=4, samples=2, sign=-1.0, gamma=2.0),
                                 DrICLConfig(weights="official", window=4)], ids=str)
def test_objective_matches_independent_reference(cfg):
    model = _model()
    b = episode_batch(BENCH.in_domain, 3, 120, torch.Generator().manual_seed(fresh_seed()), noise=0.2)
    loss, metrics = dricl_loss(model, b, replace_backend(cfg, "reference"))
    if cfg.weights == "official":
        fn = lambda ell: official_demo_weights(ell, cfg.gamma, cfg.window).float()
    elif cfg.weights == "none":
        fn = lambda ell: torch.ones_like(ell)
    else:
        fn = lambda ell: demo_weights(ell, gamma=cfg.gamma, window=cfg.window, samples=cfg.samples, sign=cfg.sign)
    ref, l_ms, l_zs = _reference(model, b, cfg.alpha, fn)
    assert torch.allclose(loss, ref, atol=1e-5)
    assert abs(metrics["zs_loss"] - l_zs.item()) < 1e-5
    if cfg.weights == "none":
        assert torch.allclose(loss, 0.5 * ((1 + cfg.alpha) * l_ms + (1 - cfg.alpha) * l_zs), atol=1e-5)


def replace_backend(cfg, backend):
    from dataclasses import replace
    return replace(cfg, backend=backend)


def test_weights_carry_no_gradient():
    "Scaling the many-shot losses' graph does not reach the weights: the gradient equals that of Σ w_k·ℓ_k with w fixed."
    model = _model()
    b = episode_batch(BENCH.in_domain, 2, 100, torch.Generator().manual_seed(fresh_seed()), noise=0.3)
    cfg = DrICLConfig(window=2, gamma=0.5, backend="reference")
    loss, _ = dricl_loss(model, b, cfg)
    g = torch.autograd.grad(loss, model.lm_head.weight)[0]
    ref, _, _ = _reference(model, b, cfg.alpha, lambda ell: demo_weights(ell, gamma=0.5, window=2))
    g_ref = torch.autograd.grad(ref, model.lm_head.weight)[0]
    assert_close(g, g_ref, 1e-5)


@pytest.mark.gpu
def test_fused_backend_matches_reference():
    model = _model(d=32, layers=1)
    b = episode_batch(BENCH.in_domain, 2, 80, torch.Generator().manual_seed(fresh_seed()), noise=0.2)
    out = {}
    for backend in ("reference", "fused"):
        model.zero_grad()
        loss, metrics = dricl_loss(model, b, DrICLConfig(window=4, backend=backend))
        loss.backward()
        out[backend] = (loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.allclose(out["fused"][0], out["reference"][0], atol=1e-5)
    assert abs(out["fused"][1]["ms_loss"] - out["reference"][1]["ms_loss"]) < 1e-5
    for n, g in out["reference"][2].items():
        assert_close(out["fused"][2][n], g, 1e-4, name=n)


# -- evaluation and Hugging Face --------------------------------------------------------------------------------
def test_shot_accuracy_of_an_oracle_and_of_a_random_model():
    class Oracle(torch.nn.Module):
        "Answers every prompt correctly from the task's rule: checks the evaluation's bookkeeping."
        def __init__(self, task):
            super().__init__()
            self.task, self.p = task, torch.nn.Parameter(torch.zeros(1))

        def generate(self, prompts, n):
            rows = []
            for p in prompts.tolist():
                start = len(p) - p[::-1].index(IN)                   # just after the query's IN
                x = tuple(t - SYMBOL0 for t in p[start:-1])
                rows.append(p + [SYMBOL0 + v for v in self.task.answer(x)] + [EOA])
            return torch.tensor(rows)

    for task in BENCH.in_domain[::8]:
        acc = shot_accuracy(Oracle(task), [task], [0, 3], n_queries=4)
        assert acc["accuracy"] == [1.0, 1.0]
    acc = shot_accuracy(_model(), BENCH.held_out[:2], [0, 2], n_queries=4)
    assert all(0 <= a <= 1 for a in acc["accuracy"]) and set(acc["by_family"]) == {BENCH.held_out[0].family}


def test_hugging_face_zero_shot_mask_and_loss():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    while True:   # a batch whose third segment holds symbols to perturb (about 3% of draws have none)
        seed = fresh_seed()
        b = episode_batch(BENCH.in_domain, 2, 60, torch.Generator().manual_seed(seed))
        seg = zero_shot_segments(b.targets)
        inside = (seg == 2) & (b.inputs >= SYMBOL0)
        if inside.any():
            break
    labels = torch.cat([torch.full_like(b.targets[:, :1], -100), b.targets[:, :-1]], 1)
    p = b.inputs.clone()
    p[inside] = SYMBOL0 + (p[inside] - SYMBOL0 + 3) % N_SYMBOLS
    mask = hf_zero_shot_mask(labels)
    for impl in ("eager", "sdpa"):
        hf.set_attn_implementation(impl)
        with torch.no_grad():
            a, c = hf(b.inputs, attention_mask=mask).logits, hf(p, attention_mask=mask).logits
        assert torch.equal(a[seg != 2], c[seg != 2]) and not torch.equal(a[seg == 2], c[seg == 2]), (impl, seed)
    cfg = DrICLConfig(window=3)
    loss, _ = dricl_hf_loss(hf, b.inputs, labels, cfg)
    with torch.no_grad():
        ce_ms = token_losses(hf(b.inputs).logits, b.targets)
        ce_zs = token_losses(hf(b.inputs, attention_mask=mask).logits, b.targets)
    assert torch.allclose(loss, dricl_objective(ce_ms, ce_zs, b.targets, cfg)[0], atol=1e-6)
    loss.backward()
    assert hf.model.layers[0].self_attn.q_proj.weight.grad.abs().max() > 0
