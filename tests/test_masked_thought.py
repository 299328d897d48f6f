"""Tests of `lmcourse.masked_thought`: the schedule, Philox in PyTorch against Triton's, the fused noisy-embedding
kernels (interpreter on CPU) against the reference — odd sizes, several blocks in every dimension, the GPU tile
shapes, poisoned outputs, the corruption's statistics and determinism, special ids, bad input (the sm_90/sm_80
compile is tests/test_gpu_compile.py, from `compile_cases`), the word problems, the loss (clean labels, SFT at rate 0, the loop's step), the
Hugging Face adapter, and the experiment at a tiny size."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import json
import math
import random
from functools import partial

import pytest
import torch
import triton
import triton.language as tl

from lmcourse.data import BOS, FILLER, IGNORE_INDEX, SEP, make_task
from lmcourse.masked_thought import (GPU_CONFIGS, MASK, SPECIAL_IDS, STYLES, VOCAB, MaskedThoughtConfig,
                                     MaskedThoughtExperiment, check_noisy_embedding, encode_problem, gpu_config,
                                     hf_masked_thought_loss, init_mask_row, mask_rate, masked_thought_loss,
                                     noisy_embedding, noisy_ids_ref, parse_answer, philox4x32,
                                     problem_batch, question_reliance, reasoning_positions, replacement_ids,
                                     run_masked_thought_experiment, summarize, token_draws, word_problems)
from lmcourse.model import ModelConfig, Transformer
from lmcourse.testing import assert_close, fresh_seed, kernel_device, kernel_dtypes
from lmcourse.train import TrainConfig, default_loss, evaluate, train

DEVICE = kernel_device()


# -- the schedule ---------------------------------------------------------------------------------------------
def test_schedule_as_released():
    assert mask_rate(0, 300, 0.4) == 0.0
    assert mask_rate(100, 300, 0.4) == pytest.approx(0.4 * 100 / 199)
    assert mask_rate(198, 300, 0.4) < 0.4 == mask_rate(199, 300, 0.4) == mask_rate(299, 300, 0.4)
    assert [mask_rate(s, 1, 0.2) for s in (0, 1, 5)] == pytest.approx([0.0, 0.2 / 1.66, 0.2])
    for bad, match in ((dict(p_max=-0.1), "p_max"), (dict(total_steps=0), "total_steps"), (dict(step=-1), "step")):
        args = {"step": 0, "total_steps": 10, "p_max": 0.4, **bad}
        with pytest.raises(ValueError, match=match):
            mask_rate(**args)


# -- Philox -----------------------------------------------------------------------------------------------------
@triton.jit
def _philox_kernel(out, n, seed, step, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    zero = o * 0
    r0, r1, r2, r3 = tl.philox(seed, o, zero + step, zero, zero)
    m = o < n
    tl.store(out + o, r0.to(tl.int64), mask=m)
    tl.store(out + n + o, r1.to(tl.int64), mask=m)
    tl.store(out + 2 * n + o, r2.to(tl.int64), mask=m)
    tl.store(out + 3 * n + o, r3.to(tl.int64), mask=m)


@pytest.mark.gpu
def test_philox_reference_equals_triton_bit_for_bit():
    rng = random.Random(fresh_seed())
    for seed, step in ((rng.getrandbits(63), rng.getrandbits(31)), (0, 0), (1, 1), (2 ** 63 - 1, 2 ** 31 - 1)):
        n = 777
        out = torch.empty(4, n, dtype=torch.int64, device=DEVICE)
        _philox_kernel[(triton.cdiv(n, 256),)](out, n, seed, step, BLOCK=256)
        t = torch.arange(n, device=DEVICE)
        assert torch.equal(torch.stack(philox4x32(seed, t, t * 0 + step, t * 0, t * 0)), out), (seed, step)
        r_hit, r_pick = token_draws(seed, step, n, DEVICE)
        assert torch.equal(r_hit, out[0]) and torch.equal(r_pick, out[1])


def test_philox_known_answer_vectors():
    # Random123's kat_vectors for philox4x32-10: counter, key -> output
    for ctr, key, want in (((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
                           ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
                           ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
                            (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))):
        c = [torch.tensor([x], dtype=torch.int64) for x in ctr]
        got = philox4x32(key[0] | key[1] << 32, *c)
        assert [int(x) for x in got] == list(want)


# -- the kernels against the reference --------------------------------------------------------------------------
CASES = [dict(shape=(3, 97), V=61, D=200),                   # 2 token blocks, 4 column chunks (ragged)
         dict(shape=(1000,), V=7, D=33),                     # 4 token blocks, 7 rows: the backward must add
         dict(shape=(2, 5, 31), V=300, D=64, ids_dtype=torch.int32),
         dict(shape=(1,), V=5, D=1),
         dict(shape=(130,), V=50, D=16, rate=0.0),
         dict(shape=(130,), V=50, D=16, rate=1.0),
         dict(shape=(64, 9), V=40, D=130, n_special=39)]      # one replacement id


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.gpu
def test_matches_reference(case):
    check_noisy_embedding(**case)


@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE), ids=str)
@pytest.mark.gpu
def test_dtypes(dtype):
    check_noisy_embedding((5, 77), V=129, D=96, dtype=dtype)


@pytest.mark.parametrize("i", range(len(GPU_CONFIGS)))
@pytest.mark.gpu
def test_gpu_tile_shapes_in_interpreter(i):
    block_t, block_d = GPU_CONFIGS[i].kwargs["BLOCK_T"], GPU_CONFIGS[i].kwargs["BLOCK_D"]
    with gpu_config(i):
        for dtype in kernel_dtypes(DEVICE):
            check_noisy_embedding((3 * block_t + 5,), V=17, D=2 * block_d + 3, dtype=dtype)


@pytest.mark.gpu
def test_corruption_does_not_depend_on_the_block_size():
    g = torch.Generator().manual_seed(fresh_seed())
    ids = torch.randint(0, 50, (4, 211), generator=g).to(DEVICE)
    corruptible = (torch.rand(4, 211, generator=g) < 0.8).to(DEVICE)
    w = torch.randn(50, 40, generator=g).to(DEVICE)
    R = replacement_ids(50, (0, 1), device=DEVICE)
    runs = [noisy_embedding(ids, w, corruptible, 0.3, seed=5, step=9, replacement=R)]
    for i in range(len(GPU_CONFIGS)):
        with gpu_config(i):
            runs.append(noisy_embedding(ids, w, corruptible, 0.3, seed=5, step=9, replacement=R))
    for r in runs[1:]:
        assert torch.equal(r.used_ids, runs[0].used_ids) and torch.equal(r.embeddings, runs[0].embeddings)


@pytest.mark.parametrize("p", [0.1, 0.4])
@pytest.mark.gpu
def test_corruption_statistics(p):
    n, V = 100_000, 103
    g = torch.Generator().manual_seed(fresh_seed())
    ids = torch.randint(0, V, (n,), generator=g).to(DEVICE)
    corruptible = (torch.arange(n) % 4 != 0).to(DEVICE)
    special = (0, 1, 2, 50)
    R = replacement_ids(V, special, device=DEVICE)
    out = noisy_embedding(ids, torch.randn(V, 4, device=DEVICE), corruptible, p, seed=fresh_seed(), step=3, replacement=R)
    k = corruptible.sum().item()
    assert abs(out.corrupted.sum().item() / k - p) < 4 * math.sqrt(p * (1 - p) / k)
    assert not out.corrupted[~corruptible].any()
    assert torch.equal(out.used_ids[~out.corrupted], ids[~out.corrupted].int())
    inserted = out.used_ids[out.corrupted].long()
    assert not torch.isin(inserted, torch.tensor(special, device=DEVICE)).any()
    counts = torch.bincount(inserted, minlength=V)[R.long()].double()
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()     # uniform over R: chi² with |R|−1 dof
    dof = len(R) - 1
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), (chi2, dof)


@pytest.mark.gpu
def test_determinism_by_seed_and_step():
    ids = torch.randint(0, 40, (3, 50), device=DEVICE)
    c = torch.ones(3, 50, dtype=torch.bool, device=DEVICE)
    w = torch.randn(40, 8, device=DEVICE)
    R = replacement_ids(40, (0,), device=DEVICE)
    draw = lambda seed, step: noisy_embedding(ids, w, c, 0.5, seed=seed, step=step, replacement=R).used_ids
    assert torch.equal(draw(3, 7), draw(3, 7))
    assert not torch.equal(draw(3, 7), draw(3, 8)) and not torch.equal(draw(3, 7), draw(4, 7))
    assert not torch.equal(draw(2 ** 40, 7), draw(2 ** 40 + 2 ** 33, 7))    # the seed's high word counts too


@pytest.mark.gpu
def test_poisoned_outputs_are_overwritten_and_the_input_is_untouched():
    # check_noisy_embedding runs under poisoned_outputs (NaN / max-int buffers); the inputs must not change either
    ids = torch.randint(0, 30, (2, 40), device=DEVICE)
    before = ids.clone()
    c = torch.rand(2, 40, device=DEVICE) < 0.5
    noisy_embedding(ids, torch.randn(30, 12, device=DEVICE), c, 0.9, seed=1, step=1, replacement=replacement_ids(30, (), DEVICE))
    assert torch.equal(ids, before)
    check_noisy_embedding((2, 40), V=30, D=12, rate=0.9)


def test_bad_inputs_raise_clear_errors():
    ids = torch.randint(0, 20, (2, 9), device=DEVICE)
    w = torch.randn(20, 8, device=DEVICE)
    c = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    R = replacement_ids(20, (0,), device=DEVICE)
    call = lambda **kw: noisy_embedding(**{"ids": ids, "weight": w, "corruptible": c, "rate": 0.4, "seed": 0, "step": 0,
                                           "replacement": R, **kw})
    for kw, match in ((dict(ids=ids.float()), "int32 or int64"), (dict(ids=ids + 20), r"ids must lie in \[0, 20\)"),
                      (dict(corruptible=c[:, :2]), "shaped like ids"), (dict(corruptible=c.float()), "bool tensor"),
                      (dict(weight=w[0]), r"\[V, D\]"), (dict(weight=w.double()), "float32, float16 or bfloat16"),
                      (dict(rate=-0.1), "rate must be"), (dict(rate=True), "rate must be"), (dict(seed=2 ** 63), "seed must be"),
                      (dict(seed=1.0), "seed must be"), (dict(step=-1), "step must be"), (dict(replacement=R[:0]), "non-empty"),
                      (dict(replacement=R.float()), "integer tensor"), (dict(replacement=R + 1), "replacement_ids must lie")):
        with pytest.raises((ValueError, TypeError), match=match):
            call(**kw)
    with pytest.raises(TypeError, match="must be a tensor"):
        call(ids=[1, 2])
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="interpreter"):
            call(weight=w.bfloat16())
        with pytest.raises(ValueError, match="not meta"):
            call(ids=ids.to("meta"), weight=w.to("meta"), corruptible=c.to("meta"), replacement=R.to("meta"))
    with pytest.raises(ValueError, match="every id is special"):
        replacement_ids(3, (0, 1, 2))
    with pytest.raises(ValueError, match="special ids must lie"):
        replacement_ids(3, (5,))


# -- word problems --------------------------------------------------------------------------------------------
def _evaluate_steps(p):
    apply = {"more": lambda a, b: a + b, "fewer": lambda a, b: a - b, "times": lambda a, b: a * b}
    value = None
    for _name, op, a, b, c in p.steps:
        assert value is None or a == value
        assert apply[op](a, b) == c and 0 <= c <= 99
        value = c
    return value


def test_word_problems_are_correct_and_phrased_by_style():
    for style in ("A", "B"):
        for p in word_problems(200, seed=fresh_seed() % 1000, style=style, distractors=2):
            assert _evaluate_steps(p) == p.answer
            assert p.solution.endswith("#### " + " ".join(str(p.answer)))
            verb = STYLES[style]["step"].split()[1]
            assert all(step.split()[1] == verb for step in p.solution.split(" . ")[:-1])
            assert p.question.count(" . ") == len(p.steps) + 1 + 2            # base, derived, 2 distractors; then the question
            ids = VOCAB.encode(p.question + " " + p.solution)
            assert MASK not in ids and BOS not in ids and SEP not in ids
    a, b = word_problems(50, seed=3), word_problems(50, seed=3)
    assert [p.question for p in a] == [p.question for p in b]
    with pytest.raises(ValueError, match="style"):
        word_problems(1, style="C")


def test_problem_batch_targets_and_reasoning_positions():
    problems = word_problems(6, seed=1, distractors=1)
    b = problem_batch(problems)
    lm = problem_batch(problems, lm=True)
    corruptible = reasoning_positions(b.inputs, b.targets)
    for i, p in enumerate(problems):
        q, s = encode_problem(p)
        L = len(q) + len(s)
        row = b.inputs[i].tolist()
        assert row[:L - 1] == (q + s)[:-1] and all(t == FILLER for t in row[L:])   # row[L - 1] is the closing SEP
        assert b.targets[i, len(q) - 1:L - 1].tolist() == s and (b.targets[i, :len(q) - 1] == IGNORE_INDEX).all()
        assert (lm.targets[i, :L - 1] != IGNORE_INDEX).all()
        assert corruptible[i].nonzero().flatten().tolist() == list(range(len(q), L - 1))    # the solution, not its SEP
    batch = make_task("word_problems", 4, seed=2)
    assert batch.info["answers"] == [p.answer for p in batch.info["problems"]]
    with pytest.raises(ValueError, match="more than width"):
        problem_batch(problems, width=10)


def test_parse_answer():
    enc = VOCAB.encode
    assert parse_answer(enc("ada owns 3 + 4 = 7 . #### 1 7") + [SEP, *enc("#### 9")]) == 17
    assert parse_answer(enc("ada owns 3 + 4 = 7 .")) is None
    assert parse_answer(enc("#### .")) is None


# -- the loss ---------------------------------------------------------------------------------------------------
def _model(d=32, layers=2, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB.vocab_size, d_model=d, n_layers=layers, n_heads=2, max_seq_len=192))


def test_loss_is_sft_at_rate_zero_and_keeps_labels_clean():
    model = _model()
    b = make_task("word_problems", 6, seed=4, distractors=1)
    inputs, targets = b.inputs.clone(), b.targets.clone()
    cfg = MaskedThoughtConfig(backend="reference")
    assert torch.allclose(masked_thought_loss(model, b, cfg, rate=0.0)[0], model(b.inputs, b.targets)[1], atol=1e-6)
    loss, _ = masked_thought_loss(model, b, cfg, rate=0.5, step=3)
    used, hit = noisy_ids_ref(b.inputs, reasoning_positions(b.inputs, b.targets), 0.5, seed=0, step=3,
                              replacement=cfg.replacement(VOCAB.vocab_size))
    assert hit.any()
    assert torch.allclose(loss, model(used.long(), b.targets)[1], atol=1e-6)   # corrupted inputs, clean targets
    assert torch.equal(b.inputs, inputs) and torch.equal(b.targets, targets)     # nothing in the batch changed
    prompt = torch.arange(b.inputs.shape[1]) < torch.tensor(b.info["prompt_lengths"])[:, None]
    assert torch.equal(used[prompt], b.inputs[prompt].int())                     # the question is never corrupted


@pytest.mark.gpu
def test_triton_and_reference_paths_agree():
    model = _model(layers=1)
    b = make_task("word_problems", 3, seed=6)
    grads = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        loss, metrics = masked_thought_loss(model, b, MaskedThoughtConfig(backend=backend), rate=0.4, step=11)
        loss.backward()
        grads[backend] = (loss.detach(), metrics["corrupted"], {n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.allclose(grads["triton"][0], grads["reference"][0], atol=1e-5)
    assert grads["triton"][1] == grads["reference"][1]
    for n, g in grads["reference"][2].items():
        assert_close(grads["triton"][2][n], g, 1e-4, name=n)


def test_the_rate_follows_the_loops_step():
    model = _model(d=16, layers=1)
    problems = word_problems(64, seed=0)
    get_batch = lambda split, g: problem_batch([problems[int(i)] for i in torch.randint(0, 64, (8,), generator=g)])
    cfg = TrainConfig(steps=12, batch_size=8, warmup_steps=0, grad_accum_steps=2, eval_every=100, eval_batches=1,
                      log_every=1, progress=False)
    hist = train(model, get_batch, cfg, loss_fn=partial(masked_thought_loss, cfg=MaskedThoughtConfig(p_max=0.4)), device="cpu")
    assert hist.metrics["rate"] == pytest.approx([mask_rate(s, 12, 0.4) for s in range(12)])
    assert hist.metrics["corrupted"][0] == 0 and all(math.isfinite(x) for x in hist.train_loss)
    assert hist.val_loss[-1] == pytest.approx(evaluate(model, get_batch, cfg, default_loss))   # evaluation is clean
    with pytest.raises(ValueError, match="needs the optimizer step"):
        masked_thought_loss(model.train(), problem_batch(problems[:2]))


def test_mask_noise_and_mask_row_init():
    model = _model(layers=1)
    init_mask_row(model)
    w = model.embed_tokens.weight
    others = torch.cat([w[:MASK], w[MASK + 1:]])
    assert torch.allclose(w[MASK], others.mean(0)) and model.lm_head.weight is w
    b = make_task("word_problems", 4, seed=8)
    cfg = MaskedThoughtConfig(noise="mask", backend="reference")
    used, hit = noisy_ids_ref(b.inputs, reasoning_positions(b.inputs, b.targets), 1.0, seed=0, step=0,
                              replacement=cfg.replacement(VOCAB.vocab_size))
    assert hit.any() and (used[hit] == MASK).all()
    with pytest.raises(ValueError, match="mask_id"):
        MaskedThoughtConfig(noise="mask", special_ids=(BOS, SEP))
    for bad, match in ((dict(p_max=2.0), "p_max"), (dict(noise="zero"), "noise"), (dict(backend="cuda"), "backend")):
        with pytest.raises(ValueError, match=match):
            MaskedThoughtConfig(**bad)
    assert set(SPECIAL_IDS) == {BOS, SEP, FILLER, MASK}


# -- measurements and the experiment -----------------------------------------------------------------------------
def test_question_reliance_probe_items():
    from lmcourse.masked_thought import _probe_items
    problems = word_problems(40, seed=5)
    items = _probe_items(problems, VOCAB, seed=0)
    assert len(items) >= 35
    eq = VOCAB.ids["="]
    for prefix, from_question, from_prefix in items:
        assert prefix[-1] == eq and from_question != from_prefix
    r = question_reliance(_model(d=16, layers=1), problems)
    assert 0.0 <= r <= 1.0


def test_experiment_runs_at_a_tiny_size():
    cfg = MaskedThoughtExperiment(
        ModelConfig(vocab_size=VOCAB.vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=128),
        TrainConfig(steps=6, batch_size=8, seq_len=128, warmup_steps=1, eval_every=100, eval_batches=1, progress=False),
        TrainConfig(steps=4, batch_size=8, seq_len=128, warmup_steps=1, eval_every=100, eval_batches=1, progress=False),
        n_train=16, epochs=2, n_test=8, test_distractors=1, arms=("sft", "mft 0.4 mask"), seeds=(0, 1), eval_every=2,
        n_steps=(1,), max_value=30)
    out = run_masked_thought_experiment(cfg, device="cpu")
    assert set(out["arms"]) == {"sft", "mft 0.4 mask"} and all(len(runs) == 2 for runs in out["arms"].values())
    run = out["arms"]["sft"][0]
    assert run["steps"] == 4 and run["history"]["metric_steps"]["dev_acc"] == [0, 1, 3]
    rows = summarize(out)
    assert [r["arm"] for r in rows] == ["sft", "mft 0.4 mask"]
    for r in rows:
        assert 0 <= r["acc_clean"] <= 1 and math.isfinite(r["gap"]) and math.isfinite(r["loss_clean"])
    json.dumps(out)                                                       # storable as a result


# -- Hugging Face -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hugging_face_adapter(backend):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    ids = torch.randint(3, 128, (2, 30))
    ids[0, 20] = 1                                                       # a special id inside the solution
    labels = ids.clone(); labels[:, :12] = -100
    cfg = MaskedThoughtConfig(p_max=0.4, special_ids=(0, 1, 2), mask_id=0, backend=backend)
    loss0, _ = hf_masked_thought_loss(hf, ids, labels, cfg, step=0, total_steps=100)
    assert torch.allclose(loss0, hf(ids, labels=labels).loss, atol=1e-6)
    loss, metrics = hf_masked_thought_loss(hf, ids, labels, cfg, step=0, total_steps=100, rate=0.9)
    loss.backward()
    ours = hf.get_input_embeddings().weight.grad.clone()
    hf.zero_grad()
    expected = hf(metrics["used_ids"].long(), labels=labels).loss
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert_close(ours, hf.get_input_embeddings().weight.grad, 1e-4, name="embedding gradient")
    used = metrics["used_ids"]
    assert torch.equal(used[labels == -100], ids[labels == -100].int()) and used[0, 20] == 1
    assert not torch.isin(used[used != ids.int()], torch.tensor([0, 1, 2])).any()
