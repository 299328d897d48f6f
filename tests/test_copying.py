"""Tests of `lmcourse.copying`: the metrics against brute force and hand-built patterns, the OV score against the full
V×V eigenvalues, the callback inside the training loop, and the statistics flag of the Cog forward kernel (interpreter
on CPU) against float64 at the interpreter's and the GPU's tiles, with bad inputs refused."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch

from lmcourse.copying import (CopyingMetrics, CopyingRun, CopyTask, _cog_forward, corpus_mixed_batches, text_repeats, train_copying, copy_accuracy, copying_milestones, head_scores,
                              induction_attention, induction_attention_ref, induction_layers, induction_scores,
                              kernel_head_scores, recording_statistics,
                              induction_targets, ov_circuits, ov_copying_scores, pattern_statistics, previous_tokens)
from lmcourse.cog import cog_attention
from lmcourse.data import ByteTokenizer, TokenStream, load_corpus
from lmcourse.model import ModelConfig, Transformer
from lmcourse.train import History, TrainConfig, train
from lmcourse.testing import (assert_close, check_against_reference, fresh_seed, gpu_config_count, gpu_tiles,
                              exact_input_dtype, kernel_device, kernel_dtypes, random_tensors, tolerance)

DEVICE = kernel_device()
TASK = CopyTask()


# -- the metrics ------------------------------------------------------------------------------------------------
def test_induction_targets_point_at_the_successor_of_the_previous_occurrence():
    batch = TASK.held_out(64, seed=fresh_seed())
    s_star, x = induction_targets(batch), batch.inputs
    rows, t = (s_star >= 0).nonzero(as_tuple=True)
    assert torch.equal(rows.bincount(minlength=64), batch.info["copy_mask"].sum(1))
    s = s_star[rows, t]
    assert (s < t).all()
    assert torch.equal(x[rows, s - 1], x[rows, t])                    # the previous occurrence of x_t ...
    assert torch.equal(x[rows, s], batch.targets[rows, t])            # ... and what followed it: the copy's target
    assert torch.equal(previous_tokens(x)[:, 1:], x[:, :-1]) and (previous_tokens(x)[:, 0] == -1).all()


def test_pattern_statistics_match_brute_force():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, Tq, Tk = 2, 3, 7, 11
    pattern = torch.rand(B, H, Tq, Tk, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 3, (B, Tk), generator=g)
    target = torch.randint(-1, Tk, (B, Tq), generator=g)
    hit, match = pattern_statistics(pattern, target, tokens)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                t = Tk - Tq + i
                assert hit[b, h, i] == (pattern[b, h, i, target[b, i]] if target[b, i] >= 0 else 0.0), seed
                expected = sum(pattern[b, h, i, s] for s in range(1, Tk) if tokens[b, s - 1] == tokens[b, t])
                assert abs(match[b, h, i] - expected) < 1e-12, seed
    with pytest.raises(ValueError, match="target must be"):
        pattern_statistics(pattern, target[:, :3], tokens)


def _tiny_model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=TASK.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, tie_embeddings=False)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


def test_head_scores_read_a_patched_induction_pattern():
    "An ideal induction pattern written into layer 1's hook_pattern scores 1 there; layer 0 stays near uniform."
    model, batch = _tiny_model(), TASK.held_out(16, seed=fresh_seed())
    B, T = batch.inputs.shape
    s_star = induction_targets(batch)
    ideal = torch.eye(T).repeat(B, 4, 1, 1)
    rows, cols = (s_star >= 0).nonzero(as_tuple=True)
    ideal[rows, :, cols] = 0.0
    ideal[rows, :, cols, s_star[rows, cols]] = 1.0
    with model.hooks({"blocks.1.attn.hook_pattern": ideal}):
        scores = head_scores(model, batch)
    assert scores.induction.shape == (2, 4)
    assert torch.allclose(scores.induction[1], torch.ones(4)) and torch.allclose(scores.token_match[1], torch.ones(4))
    assert scores.induction[0].max() < 0.3 and scores.previous_token[1].max() == 0
    with model.hooks({"blocks.1.attn.hook_pattern": ideal}):
        assert torch.equal(induction_scores(model, batch), scores.induction)


def test_previous_token_score_of_a_previous_token_head():
    model, batch = _tiny_model(), TASK.held_out(8)
    T = batch.inputs.shape[1]
    prev = torch.zeros(T, T)
    prev[0, 0] = 1.0
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    with model.hooks({"blocks.0.attn.hook_pattern": prev}):
        assert torch.allclose(head_scores(model, batch).previous_token[0], torch.ones(4))


def test_copy_accuracy_counts_only_the_copy_positions():
    "An oracle: the last residual is set to the target's unembedding row (orthonormal rows), then half the copies are broken."
    model, batch = _tiny_model(n_layers=1), TASK.held_out(32, seed=fresh_seed())
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.linalg.qr(torch.randn(64, TASK.vocab_size)).Q.T * 8.0)
        model.norm.weight.fill_(1.0)
    wanted = batch.targets.clamp(min=0)
    with model.hooks({"blocks.0.hook_resid_post": model.lm_head.weight[wanted].detach()}):
        assert copy_accuracy(model, batch) == 1.0
    copy = batch.info["copy_mask"]
    broken = wanted.clone()
    coin = torch.rand(copy.shape, generator=torch.Generator().manual_seed(fresh_seed()))
    broken[copy & (coin < 0.5)] = 0                                  # token 0 (BOS) is never a copy target
    expected = (broken == batch.targets)[copy].float().mean().item()
    with model.hooks({"blocks.0.hook_resid_post": model.lm_head.weight[broken].detach()}):
        assert abs(copy_accuracy(model, batch) - expected) < 1e-6 and expected < 0.7
    empty = TASK.held_out(2)
    empty.info["copy_mask"] = torch.zeros_like(empty.info["copy_mask"])
    with pytest.raises(ValueError, match="no copy positions"):
        copy_accuracy(model, empty)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_ov_scores_match_the_full_vocabulary_matrix(n_kv_heads):
    model = _tiny_model(n_kv_heads=n_kv_heads)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1: p.uniform_(0.5, 1.5)                      # norm gains are part of the circuit
    w_e, w_u, g_f = (t.double() for t in (model.embed_tokens.weight, model.lm_head.weight, model.norm.weight))
    scores = ov_copying_scores(model)
    D, group = 16, 4 // n_kv_heads
    for l, block in enumerate(model.blocks):
        g, v, o = (t.double() for t in (block.attn_norm.weight, block.attn.v_proj.weight, block.attn.o_proj.weight))
        for h in range(4):
            hk = h // group
            M = (w_e * g) @ v[hk * D:(hk + 1) * D].T @ o[:, h * D:(h + 1) * D].T @ (g_f[:, None] * w_u.T)   # [V, V]
            lam = torch.linalg.eigvals(M)
            assert abs((lam.real.sum() / lam.abs().sum()).item() - scores[l, h].item()) < 1e-5
            top = lam.abs().sort(descending=True).values[:D]              # rank D: the cyclic D×D product's eigenvalues
            assert torch.allclose(top, torch.linalg.eigvals(ov_circuits(model)[l, h]).abs().sort(descending=True).values, rtol=1e-6)
    with pytest.raises(TypeError, match="Llama-family"):
        ov_copying_scores(torch.nn.Linear(2, 2))


def test_callback_logs_inside_the_training_loop_and_milestones():
    task = CopyTask(length=8, min_length=4, max_prefix=4, max_gap=2)
    model = Transformer(ModelConfig(vocab_size=task.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=32))
    cb = CopyingMetrics(2, task.held_out(8), task.held_out(8, seed=7, text="markov", lm_targets=True))
    cfg = TrainConfig(steps=5, batch_size=4, seq_len=task.seq_len, warmup_steps=1, eval_every=5, eval_batches=1, progress=False)
    hist = train(model, task.train_batches(4), cfg, device="cpu", callbacks=[cb])
    keys = {"copy_accuracy", "text_loss", "induction_L0", "induction_L1", "previous_token_L0", "previous_token_L1"}
    assert keys <= set(hist.metrics) and hist.metric_steps["copy_accuracy"] == [0, 1, 3, 4]
    assert [r["step"] for r in cb.records] == [0, 1, 3, 4] and cb.records[0]["ov"].shape == (2, 2)
    assert all(0 <= x <= 1 for x in hist.metrics["induction_L1"])
    # milestones on a made-up history: the loss makes 90% of its drop at step 20, copying passes 0.3 at step 40
    h = History()
    for step, loss, acc in ((0, 4.0, 0.0), (10, 3.0, 0.02), (20, 2.1, 0.05), (30, 2.0, 0.2), (40, 2.0, 0.5)):
        h.log(step, text_loss=loss, copy_accuracy=acc)
    assert copying_milestones(h) == {"loss_step": 20, "copy_step": 40}
    assert copying_milestones(h, copy_threshold=0.9)["copy_step"] is None
    recs = [{"step": 0, "induction": torch.tensor([[0.1, 0.2], [0.1, 0.1]])}, {"step": 5, "induction": torch.tensor([[0.1, 0.2], [0.9, 0.1]])}]
    assert induction_layers(recs) == [(0, []), (5, [1])]


# -- the kernel: STATS flag of the Cog forward -------------------------------------------------------------------
CASES = [
    dict(B=1, H=2, Hkv=2, Tq=45, Tk=45, D=16),
    dict(B=2, H=4, Hkv=2, Tq=77, Tk=77, D=32),                  # odd length, 3 key blocks at the CPU tile, GQA
    dict(B=1, H=2, Hkv=1, Tq=37, Tk=70, D=24),                  # fewer queries (bottom-right causal), odd head dim
    dict(B=1, H=2, Hkv=2, Tq=50, Tk=50, D=16, causal=False),
    dict(B=1, H=2, Hkv=2, Tq=1, Tk=37, D=16),                   # one decoding step
    dict(B=2, H=2, Hkv=1, Tq=61, Tk=61, D=16, segments=True),
    dict(B=1, H=2, Hkv=2, Tq=70, Tk=70, D=32, qk_mult=8),       # large logits: |q·k|·scale in the hundreds
    dict(B=1, H=2, Hkv=2, Tq=45, Tk=45, D=16, qk_mult=30, tol=1e-3),   # logits ≈ 2000: fp32 rounding of the scores
    dict(B=1, H=2, Hkv=1, Tq=40, Tk=40, D=16, scale=0.61, vocab=2),    # non-default scale, many matching keys
    dict(B=1, H=1, Hkv=1, Tq=33, Tk=33, D=128, no_target=True),
]


def _check(B, H, Hkv, Tq, Tk, D, causal=True, segments=False, qk_mult=1.0, scale=None, tol=None, vocab=6,
           no_target=False, dtype=torch.float32):
    if qk_mult > 1 and exact_input_dtype(dtype, DEVICE) != dtype:   # large logits on a GPU: fp16, its own tolerance
        dtype, tol = exact_input_dtype(dtype, DEVICE), None
    (q, k, v), seed = random_tensors([(B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)], dtype, DEVICE, scale=1.5)
    q, k = q * qk_mult, k * qk_mult
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, Tk), generator=g).to(DEVICE)
    target = None if no_target else torch.randint(-1, Tk, (B, Tq), generator=g).to(DEVICE)
    seg = torch.randint(0, 3, (B, Tk), generator=g).sort(-1).values.to(DEVICE) if segments else None
    tol = tol if tol is not None else tolerance(dtype, DEVICE)
    errors = check_against_reference(
        lambda q, k, v: induction_attention(q, k, v, tokens, target, causal=causal, scale=scale, segment_ids=seg),
        lambda q, k, v: induction_attention_ref(q, k, v, tokens, target, causal=causal, scale=scale, segment_ids=seg),
        [q, k, v], grad=False, tol=tol, seed=seed)
    if no_target:                                                    # no designated key: every hit is exactly 0
        assert induction_attention(q, k, v, tokens)[1].abs().max() == 0
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_stats_kernel_matches_reference(case):
    _check(**case)


def _stats_launch():
    q = torch.empty(1, 1, 64, 32)
    induction_attention(q, q, q, torch.zeros(1, 64, dtype=torch.long))


# The GPU's tiles (each config of the statistics variant) on problems several blocks long in both dimensions.
GPU_TILE_CASES = [dict(Tq=300, Tk=300, D=64), dict(Tq=130, Tk=330, D=40), dict(Tq=150, Tk=290, D=32, segments=True)]


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(gpu_config_count(_stats_launch)))
@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_stats_kernel_at_gpu_tiles(config, case):
    with gpu_tiles(config):
        _check(B=1, H=2, Hkv=1, **case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE), ids=str)
def test_stats_kernel_dtypes(dtype):
    _check(B=1, H=2, Hkv=1, Tq=47, Tk=47, D=32, dtype=dtype)


@pytest.mark.gpu
def test_stats_flag_leaves_the_output_and_lse_unchanged():
    "STATS on and off: the same attention output and log-sum-exp (the statistics only add sums)."
    (q, k, v), seed = random_tensors([(2, 2, 70, 32)] * 3, device=DEVICE)
    tokens = torch.randint(0, 5, (2, 70)).to(DEVICE)
    ids = lambda t: t.to(torch.int32).contiguous()
    o, lse = _cog_forward(q, k, v, None, True, 32 ** -0.5, False)
    o2, lse2, _, _ = _cog_forward(q, k, v, None, True, 32 ** -0.5, False, stats=(ids(tokens), ids(tokens), ids(tokens)))
    if DEVICE.type == "cpu":                                         # the same tiles: bit for bit
        assert torch.equal(o, o2) and torch.equal(lse, lse2), seed
    else:                                                            # the autotuner may pick other tiles for STATS
        assert_close(o2, o, seed=seed)
        assert_close(lse2, lse, seed=seed)
    assert_close(o, cog_attention(q, k, v, signed=False), seed=seed)


def test_stats_bad_inputs_raise_clear_errors():
    (q, k, v), _ = random_tensors([(1, 2, 40, 32)] * 3, device=DEVICE)
    tokens = torch.zeros(1, 40, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="tokens must be an integer tensor of shape"):
        induction_attention(q, k, v, tokens.float())
    with pytest.raises(ValueError, match="tokens must be an integer tensor of shape"):
        induction_attention(q, k, v, tokens[:, :20])
    with pytest.raises(ValueError, match="target must be an integer tensor of shape"):
        induction_attention(q, k, v, tokens, tokens[:, :5])
    with pytest.raises(ValueError, match=r"target must lie in \[-1, Tk\)"):
        induction_attention(q, k, v, tokens, tokens + 40)
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        induction_attention(q, k, v, tokens - 1)
    with pytest.raises(ValueError, match="forward only"):
        induction_attention(q.requires_grad_(), k, v, tokens)
    with pytest.raises(ValueError, match="head_dim=8 is not supported"):          # the kernel's own checks
        induction_attention(q[..., :8].detach(), k[..., :8], v[..., :8], tokens)
    with pytest.raises(ValueError, match="more queries"):
        induction_attention(q.detach(), k[:, :, :20], v[:, :, :20], tokens[:, :20])


@pytest.mark.gpu
def test_kernel_head_scores_equal_the_pattern_scores():
    "The scores from the statistics kernel inside the model (two forward passes) equal those from materialised patterns."
    model, batch = _tiny_model(n_kv_heads=2).to(DEVICE), TASK.held_out(6, seed=fresh_seed()).to(DEVICE)
    with torch.no_grad():                                   # larger logits: peaked, head-specific patterns
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(30.0)
            block.attn.k_proj.weight.mul_(30.0)
    ours, reference = kernel_head_scores(model, batch), head_scores(model, batch)
    tol = 1e-4 if DEVICE.type == "cpu" else 2e-2                     # a GPU's fp32 dots are TF32: logits of tens
    for name in ("induction", "previous_token", "token_match"):
        assert_close(getattr(ours, name), getattr(reference, name), tol, name)
    assert reference.induction.max() - reference.induction.min() > 0.02           # not all uniform (draws: 0.04-0.3)
    before = [b.attn.attn_fn for b in model.blocks]
    with torch.no_grad(), recording_statistics(model, batch.inputs, induction_targets(batch)) as records:
        logits, _ = model(batch.inputs)
    assert len(records) == 2 and records[0][0].shape == (6, 4, batch.inputs.shape[1])
    assert [b.attn.attn_fn for b in model.blocks] == before                        # restored
    with torch.no_grad():
        assert_close(logits, model(batch.inputs)[0], tol, name="logits")         # the kernel computes the same attention
    with pytest.raises(TypeError, match="lmcourse Transformer"):
        with recording_statistics(torch.nn.Linear(2, 2), batch.inputs, batch.inputs): pass


def test_corpus_mixed_batches_and_a_tiny_full_style_run():
    "The full run's data path on CPU: half byte-level stdlib windows (segment ids), half synthetic rows; train_copying runs on it."
    task = CopyTask(vocab_size=257, length=8, min_length=4, max_prefix=8, max_gap=4)
    stream = TokenStream.from_docs(load_corpus("stdlib", "train", max_bytes=100_000), ByteTokenizer())
    batch = corpus_mixed_batches(task, stream, 6)("train", torch.Generator().manual_seed(fresh_seed()))
    assert batch.inputs.shape == batch.targets.shape == batch.segment_ids.shape == (6, task.seq_len)
    assert (batch.segment_ids[3:] == 0).all() and batch.inputs.max() < 257
    with pytest.raises(ValueError, match="vocab_size = 257"):
        corpus_mixed_batches(CopyTask(), stream, 6)
    run = CopyingRun(task, ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=64),
                     TrainConfig(steps=3, batch_size=4, seq_len=task.seq_len, warmup_steps=1, eval_every=3, eval_batches=1,
                                 progress=False), every=2, n_eval=8, attention_only=False, corpus_bytes=100_000)
    model, hist, metrics = train_copying(run)
    assert hist.metric_steps["copy_accuracy"] == [0, 1, 2] and len(metrics.records) == 3
    assert hist.metric_steps["text_copy_accuracy"] == [0, 1, 2]


def test_text_repeats_copy_a_span_of_natural_text():
    stream = TokenStream.from_docs(load_corpus("stdlib", "val", max_bytes=50_000), ByteTokenizer())
    batch = text_repeats(stream, 16, length=7, width=30, seed=fresh_seed())
    assert batch.inputs.shape == (16, 36) and batch.info["copy_mask"].sum(1).eq(6).all()
    first = batch.info["first"]
    assert ((1 <= first) & (first <= 23)).all() and len(set(first.tolist())) > 1          # the offset varies
    s_star, x = induction_targets(batch), batch.inputs
    rows, t = (s_star >= 0).nonzero(as_tuple=True)
    assert torch.equal(x[rows, s_star[rows, t] - 1], x[rows, t])                         # the same span, shifted
    assert torch.equal(x[rows, s_star[rows, t]], batch.targets[rows, t])
    assert (batch.targets[~batch.info["copy_mask"]] == -100).all()
    with pytest.raises(ValueError, match="length < width"):
        text_repeats(stream, 2, length=30, width=30)
