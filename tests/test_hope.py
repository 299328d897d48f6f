"""Tests of `lmcourse.hope`: the cutoff rule and unseen-angle counts, the reference, both Triton kernels (interpreter
on CPU) against the float64 reference at every GPU tile, the model module and the experiment's pipeline.
The sm_90/sm_80 compile of the GPU launches is tests/test_gpu_compile.py, through `lmcourse.hope.compile_cases`.
The kernel tests are marked `gpu`: `make gpu` runs them on the GPU in every dtype."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import json
import math

import pytest
import torch

from lmcourse.hope import (GPU_CONFIGS, LAYOUTS, apply_hope, decay_profile, hope_frequencies, hope_kept_pairs,
                           hope_rotary, hope_rotary_simple_, launch_config, positional_encoding, task_offsets, task_rows,
                           unseen_angle_pairs)
from lmcourse.model import KVCache, ModelConfig, Transformer, apply_rotary, rope_pairs
from lmcourse.testing import (assert_close, check_against_reference, fresh_seed, kernel_device, kernel_dtypes,
                              random_tensors, tolerance)

DEVICE = kernel_device()


# -- the cutoff rule --------------------------------------------------------------------------------------------
NOTES_TABLE = [(128, 10_000, 2048, 41), (128, 10_000, 4096, 46), (128, 500_000, 8192, 35), (64, 10_000, 512, 16),
               (64, 10_000, 1024, 18), (64, 10_000, 256, 13), (16, 10_000, 64, 3)]


@pytest.mark.parametrize("D,base,L,kept", NOTES_TABLE)
def test_kept_pairs_and_unseen_angles_match_the_notes(D, base, L, kept):
    assert hope_kept_pairs(D, base, L) == kept
    assert unseen_angle_pairs(D, base, L) == D // 2 - kept          # RoPE: exactly the dropped pairs
    assert unseen_angle_pairs(D, base, L, kept_pairs=kept) == 0      # HoPE: none


def test_unseen_angles_issue_example_and_bad_arguments():
    assert unseen_angle_pairs(64, 10_000, 512, test_len=1024) == 16
    assert unseen_angle_pairs(64, 10_000, 512, test_len=1024, kept_pairs=16) == 0
    assert unseen_angle_pairs(64, 10_000, 512, test_len=1024, kept_pairs=20) == 4     # keeping too many brings them back
    with pytest.raises(ValueError, match="must exceed"):
        unseen_angle_pairs(64, 10_000, 512, test_len=512)
    with pytest.raises(ValueError, match="even"):
        hope_kept_pairs(63, 10_000, 512)
    with pytest.raises(ValueError, match="kept_pairs must lie"):
        hope_frequencies(64, 33)


def test_frequencies_are_rope_with_zeros():
    theta = hope_frequencies(64, 16)
    assert theta.dtype == torch.float64 and torch.equal(theta[16:], torch.zeros(16, dtype=torch.float64))
    assert torch.allclose(theta[:16], 10_000.0 ** (-torch.arange(16, dtype=torch.float64) / 32), rtol=0, atol=1e-15)
    theta[0] = 7.0                                                   # a copy: the cache is not corrupted
    assert hope_frequencies(64, 16)[0] == 1.0


def test_decay_profile_numbers():
    far, near = torch.arange(2048, 8192), torch.arange(512, 1024)
    assert abs(decay_profile(64, far).mean().item() - 0.016) < 5e-4
    assert abs(decay_profile(64, far, 16).mean().item() - 0.501) < 5e-4
    assert abs(decay_profile(64, near).mean().item() - 0.203) < 5e-4
    assert abs(decay_profile(64, near, 16).mean().item() - 0.500) < 5e-4
    dist = torch.arange(0, 300)                                      # closed form: (2/D) Σ cos(Δθ_i)
    theta = hope_frequencies(64, 16)
    assert torch.allclose(decay_profile(64, dist, 16), torch.cos(dist[:, None].double() * theta).mean(1), atol=1e-12)


# -- the reference ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_is_rope_with_zeroed_frequencies(layout):
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(2, 3, 17, 48, generator=g)
    pos = torch.randint(-50, 9000, (2, 17), generator=g)
    y = apply_hope(x, pos, 9, layout=layout)
    assert_close(y, apply_rotary(x.double(), pos, hope_frequencies(48, 9), layout), 1e-6)
    dropped = rope_pairs(48, layout)[9:].flatten()
    assert torch.equal(y[..., dropped], x[..., dropped])
    assert torch.equal(apply_hope(x, pos, 0, layout=layout), x)                                  # NoPE
    assert_close(apply_hope(x, pos, 24, layout=layout), apply_rotary(x.double(), pos, hope_frequencies(48, 24), layout), 1e-6)


def test_reference_is_relative():
    g = torch.Generator().manual_seed(fresh_seed())
    q, k = torch.randn(2, 1, 1, 1, 32, generator=g, dtype=torch.float64).unbind(0)
    logit = lambda m, n: (apply_hope(q, torch.tensor([m]), 6) * apply_hope(k, torch.tensor([n]), 6)).sum()
    assert torch.allclose(logit(5000, 4990), logit(10, 0), atol=1e-9)
    assert not torch.allclose(logit(5000, 4990), logit(12, 0), atol=1e-6)


def test_reference_rejects_bad_input():
    x = torch.randn(1, 2, 5, 16)
    with pytest.raises(TypeError, match="integer"):
        apply_hope(x, torch.arange(5.0), 3)
    with pytest.raises(ValueError, match="shape"):
        apply_hope(x, torch.arange(6), 3)
    with pytest.raises(ValueError, match="layout"):
        apply_hope(x, torch.arange(5), 3, layout="neox")


# -- the kernels --------------------------------------------------------------------------------------------------
def _elementwise(actual, expected):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float("inf") if not torch.isfinite(a).all() else ((a - e).abs().max() / e.abs().max()).item()


def _check(B, H, Hkv, T, D, kept, layout="half", batch_positions=False, offset=0, inplace=False, transposed=False,
           dtype=torch.float32):
    shapes = [(B, T, H, D), (B, T, Hkv, D)] if transposed else [(B, H, T, D), (B, Hkv, T, D)]
    (q, k), seed = random_tensors(shapes, dtype, DEVICE)
    if transposed:                                               # the engine's views of [B, T, H, D] projections
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randint(0, 3 * T, (B, T), generator=g) if batch_positions else torch.arange(T)) + offset
    pos = pos.to(DEVICE)
    def fn(q, k):
        return hope_rotary(q.clone() if inplace else q, k.clone() if inplace else k, pos, kept, layout=layout, inplace=inplace)
    def ref(q, k):
        return apply_hope(q, pos, kept, layout=layout), apply_hope(k, pos, kept, layout=layout)
    errors = check_against_reference(fn, ref, [q, k], seed=seed)
    for out, expected in zip(fn(q, k), ref(q.double(), k.double())):
        assert _elementwise(out, expected) <= 4 * tolerance(dtype, DEVICE), seed
    return errors


CASES = [
    dict(B=2, H=3, Hkv=1, T=45, D=24, kept=5),                              # odd sizes, GQA, ragged blocks
    dict(B=1, H=4, Hkv=2, T=70, D=64, kept=16, layout="interleaved"),       # several token blocks
    dict(B=2, H=2, Hkv=2, T=33, D=128, kept=41, batch_positions=True),      # positions [B, T]
    dict(B=1, H=2, Hkv=1, T=20, D=64, kept=16, offset=1_000_000),          # a large KV-cache offset
    dict(B=2, H=2, Hkv=2, T=37, D=32, kept=7, inplace=True),
    dict(B=2, H=2, Hkv=1, T=41, D=32, kept=9, inplace=True, layout="interleaved", batch_positions=True),
    dict(B=2, H=3, Hkv=3, T=19, D=16, kept=3, transposed=True),
    dict(B=1, H=2, Hkv=2, T=19, D=16, kept=3, transposed=True, inplace=True),
    dict(B=1, H=2, Hkv=1, T=23, D=40, kept=20),                             # RoPE (every pair)
    dict(B=1, H=2, Hkv=1, T=23, D=40, kept=0),                              # NoPE: a copy
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_kernel_matches_reference(case):
    _check(**case)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: f"P{c['BLOCK_P']}-T{c['BLOCK_T']}")
@pytest.mark.parametrize("inplace", [False, True])
def test_kernel_at_every_gpu_tile(cfg, inplace):
    # out of place a program processes D/2 pairs, in place `kept` pairs: both pick BLOCK_P = cfg's
    D = 2 * cfg["BLOCK_P"] if not inplace else min(256, 4 * cfg["BLOCK_P"])
    kept = max(1, D // 4) if not inplace else cfg["BLOCK_P"]
    assert launch_config(triton_next_pow2(D // 2 if not inplace else kept)) == {k: cfg[k] for k in ("BLOCK_T", "num_warps")}
    _check(1, 2, 1, 2 * cfg["BLOCK_T"] + 3, D, kept, inplace=inplace)


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE), ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_kernel_dtypes(dtype, inplace):
    _check(2, 2, 1, 37, 64, 18, inplace=inplace, dtype=dtype)


@pytest.mark.gpu
def test_positions_int32_equal_int64():
    (q, k), _ = random_tensors([(1, 2, 30, 32), (1, 1, 30, 32)], device=DEVICE)
    pos = torch.arange(500, 530, device=DEVICE)
    a, b = hope_rotary(q, k, pos, 8), hope_rotary(q, k, pos.int(), 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
def test_packing_and_cache_offsets():
    (q, k), _ = random_tensors([(1, 2, 40, 32), (1, 1, 40, 32)], device=DEVICE)
    lengths = [13, 20, 7]
    packed = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    q_rot, k_rot = hope_rotary(q, k, packed, 9)
    start = 0
    for n in lengths:
        alone = hope_rotary(q[:, :, start:start + n], k[:, :, start:start + n], torch.arange(n, device=DEVICE), 9)
        assert torch.allclose(q_rot[:, :, start:start + n], alone[0], atol=1e-6)
        assert torch.allclose(k_rot[:, :, start:start + n], alone[1], atol=1e-6)
        start += n
    full = hope_rotary(q, k, torch.arange(40, device=DEVICE), 9)
    step = hope_rotary(q[:, :, 30:], k[:, :, 30:], torch.arange(30, 40, device=DEVICE), 9)
    assert torch.allclose(step[0], full[0][:, :, 30:], atol=1e-6) and torch.allclose(step[1], full[1][:, :, 30:], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:invalid value encountered")     # the interpreter evaluates both sides of tl.where
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_touches_only_kept_pairs(layout):
    (q, k), _ = random_tensors([(2, 2, 35, 64), (2, 1, 35, 64)], device=DEVICE)
    content, rotated = rope_pairs(64, layout)[16:].flatten(), rope_pairs(64, layout)[:16].flatten()
    q[..., content] = float("nan")
    k[..., content] = float("inf")
    out = hope_rotary(q, k, torch.arange(35, device=DEVICE), 16, layout=layout)
    q2, k2 = q.clone(), k.clone()
    res = hope_rotary(q2, k2, torch.arange(35, device=DEVICE), 16, layout=layout, inplace=True)
    assert res[0] is q2 and res[1] is k2
    assert q2[..., content].isnan().all() and k2[..., content].isinf().all()
    assert torch.equal(q2[..., rotated], out[0][..., rotated]) and torch.equal(k2[..., rotated], out[1][..., rotated])
    assert torch.isfinite(out[0][..., rotated]).all()
    assert out[0][..., content].isnan().all() and out[1][..., content].isinf().all()      # copied exactly, not inf·0


@pytest.mark.gpu
def test_inplace_inside_autograd_graph():
    w = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    h = torch.randn(2, 9, 32, device=DEVICE)
    def loss(inplace):
        qk = (h @ w).view(2, 9, 2, 32).transpose(1, 2)
        q, k = hope_rotary(qk[:, :1], qk[:, 1:], torch.arange(9, device=DEVICE), 5, inplace=inplace)
        return (q * k.roll(1, 2)).sum()
    (a,) = torch.autograd.grad(loss(True), w)
    (b,) = torch.autograd.grad(loss(False), w)
    assert_close(a, b, 1e-5)


@pytest.mark.gpu
def test_gradient_of_only_one_output():
    (q, k), _ = random_tensors([(1, 2, 12, 16), (1, 1, 12, 16)], device=DEVICE)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_rot, _ = hope_rotary(q, k, torch.arange(12, device=DEVICE), 3)
    dq, dk = torch.autograd.grad(q_rot.sum(), (q, k), allow_unused=True)
    assert dk is None or dk.abs().max() == 0
    ref = torch.autograd.grad(apply_hope(q.double(), torch.arange(12), 3).sum(), q)[0]
    assert_close(dq, ref)


@pytest.mark.gpu
def test_short_kernel():
    (x,), seed = random_tensors([(2, 3, 37, 32)], device=DEVICE)
    pos = torch.arange(100, 137)
    expected = apply_hope(x.double(), pos, 7)
    out = hope_rotary_simple_(x, pos.to(DEVICE), 7)
    assert out is x
    assert_close(x, expected, seed=seed)
    assert _elementwise(x, expected) <= 4 * tolerance(x.dtype, DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        hope_rotary_simple_(x.transpose(1, 2), pos, 7)


def test_bad_inputs_raise_clear_errors():
    (q, k), _ = random_tensors([(1, 2, 8, 32), (1, 1, 8, 32)], device=DEVICE)
    p = torch.arange(8, device=DEVICE)
    with pytest.raises(ValueError, match="kept_pairs must be an integer"):
        hope_rotary(q, k, p, 17)
    with pytest.raises(ValueError, match="kept_pairs must be an integer"):
        hope_rotary(q, k, p, 3.0)
    with pytest.raises(ValueError, match="must agree"):
        hope_rotary(q, k[:, :, :5], p, 4)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        hope_rotary(q[0], k, p, 4)
    with pytest.raises(TypeError, match="integer tensor"):
        hope_rotary(q, k, p.float(), 4)
    with pytest.raises(TypeError, match="integer tensor"):
        hope_rotary(q, k, list(range(8)), 4)
    with pytest.raises(ValueError, match="positions must have shape"):
        hope_rotary(q, k, p[:5], 4)
    with pytest.raises(ValueError, match="positions must have shape"):
        hope_rotary(q, k, p.expand(3, 8), 4)
    with pytest.raises(ValueError, match="supports float32"):
        hope_rotary(q.double(), k.double(), p, 4)
    with pytest.raises(ValueError, match="share a dtype"):
        hope_rotary(q.half(), k, p, 4)
    with pytest.raises(ValueError, match="layout must be"):
        hope_rotary(q, k, p, 4, layout="gptj")
    with pytest.raises(ValueError, match="separate memory"):
        hope_rotary(q, q, p, 4, inplace=True)
    with pytest.raises(ValueError, match="unit stride"):
        hope_rotary(q.transpose(2, 3), k.transpose(2, 3), torch.arange(32, device=DEVICE), 4, inplace=True)
    with pytest.raises(ValueError, match="head_dim=512"):
        hope_rotary(*(torch.randn(1, 1, 4, 512, device=DEVICE) for _ in range(2)), torch.arange(4, device=DEVICE), 4)
    with pytest.raises(ValueError, match="head_dim=7"):
        hope_rotary(*(torch.randn(1, 1, 4, 7, device=DEVICE) for _ in range(2)), torch.arange(4, device=DEVICE), 2)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="interpreter"):
            hope_rotary(q.bfloat16(), k.bfloat16(), p, 4)
        with pytest.raises(ValueError, match="not meta"):
            hope_rotary(q.to("meta"), k.to("meta"), p.to("meta"), 4)


# -- the model module and the experiment -------------------------------------------------------------------------
def test_positional_encodings_in_the_model():
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    kinds = {kind: positional_encoding(kind, train_len=32) for kind in ("rope", "hope", "nope")}
    assert [f(cfg, 0).kept_pairs for f in kinds.values()] == [8, hope_kept_pairs(16, 10_000, 32), 0]
    torch.manual_seed(0)
    model = Transformer(cfg, positional=kinds["hope"])
    assert [b.attn.positional.kept_pairs for b in model.blocks] == [2, 2]
    kernel_model = Transformer(cfg, positional=positional_encoding("hope", 32, backend="triton"))
    kernel_model.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 64, (2, 40))
    logits, _ = model(tokens)
    assert_close(kernel_model(tokens)[0], logits, 1e-4)
    cache = KVCache(cfg.n_layers)
    steps = [kernel_model(tokens[:, :30], cache=cache)[0]] + [kernel_model(tokens[:, t:t + 1], cache=cache)[0]
                                                               for t in range(30, 40)]
    assert_close(torch.cat(steps, 1), logits, 1e-4)
    rope = Transformer(cfg)                                          # the engine's own RoPE = kept_pairs D/2
    rope.load_state_dict(model.state_dict())
    ours = Transformer(cfg, positional=kinds["rope"])
    ours.load_state_dict(model.state_dict())
    assert_close(ours(tokens)[0], rope(tokens)[0], 1e-5)
    with pytest.raises(ValueError, match="kind"):
        positional_encoding("alibi", 32)


@pytest.mark.parametrize("name", ["passkey", "associative_recall", "copy"])
def test_task_rows_fill_their_range(name):
    ids = task_offsets(256)
    for L in (64, 256):
        b = task_rows(name, 8, L, 256, seed=3)
        assert b.inputs.shape == (8, L) and b.targets.shape == (8, L)
        lo = ids[name]
        assert ((b.inputs >= lo) & (b.inputs < ids["vocab_size"])).all()
        answers = b.targets[b.targets != -100]
        assert len(answers) > 0 and (answers >= lo).all() and (answers < ids["pad"]).all()


def test_smoke_run_pipeline():
    from lmcourse.hope import hope_extrapolation_run, hope_run_config
    cfg = hope_run_config()
    cfg.train.steps, cfg.train.eval_every, cfg.text_bytes, cfg.eval_rows = 20, 10, 150_000, 8
    result = hope_extrapolation_run(cfg, seeds=(0,), encodings=("rope", "hope"))
    assert [r["encoding"] for r in result["runs"]] == ["rope", "hope"]
    for run in result["runs"]:
        assert run["history"]["val_loss"][-1] < run["history"]["val_loss"][0]
        probes = run["history"]["metrics"]
        assert len(probes["passkey_at_2L"]) == len(run["history"]["val_steps"]) and run["history"]["epochs"] > 0
        for f in result["factors"]:
            ev = run["eval"][f"{f}x"]
            assert all(math.isfinite(v) for v in ev["text_loss"].values()) and len(ev["text_loss"]) == int(math.log2(f)) + 1
            assert len(ev["attention_by_distance"]) == cfg.model.n_layers
            w = torch.tensor(ev["attention_by_distance"])
            assert (w >= 0).all() and (w.sum(1) <= 1 + 1e-5).all()
    json.dumps(result)                                               # stored as JSON by the GPU script
    budget = hope_extrapolation_run(cfg, seeds=(0, 1), encodings=("nope",), time_budget_s=0.0)
    assert len(budget["runs"]) == 1 and budget["skipped"] == [{"encoding": "nope", "seed": 1}]


def test_benchmark_code_runs_at_tiny_sizes(monkeypatch):
    "Every provider of the GPU sweep, run once on the CPU (the timing itself needs a GPU): the code paths, not the numbers."
    import lmcourse.bench
    from lmcourse.hope import bandwidth_summary, benchmark_hope

    def one_call_sweep(providers, xs, *, flops=None, bytes_moved=None, x_name="x"):
        rows = []
        for x in xs:
            for name, make in providers.items():
                made = make(x)
                fn = made[0] if isinstance(made, tuple) else made
                fn()
                rows.append({x_name: x, "provider": name, "ms": 1.0, "tbps": bytes_moved(x) / 1e9})
        return {"x_name": x_name, "rows": rows}

    monkeypatch.setattr(lmcourse.bench, "run_sweep", one_call_sweep)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)                # no C++ toolchain needed for the check
    result = benchmark_hope(seq_lens=(16, 40), shapes=((2, 16),), batch=2, dtype=torch.float32, device=DEVICE.type)
    assert sorted(result) == ["forward_H2_D16", "fwd_bwd_H2_D16"]
    fwd = result["forward_H2_D16"]
    assert {r["provider"] for r in fwd["rows"]} == {"triton", "triton in-place", "eager", "compile", "copy"}
    assert {r["provider"] for r in result["fwd_bwd_H2_D16"]["rows"]} == {"triton", "triton in-place", "eager", "compile"}
    summary = bandwidth_summary(fwd)
    assert all(r["of_copy"] == pytest.approx(1.0) for r in summary if r["provider"] in ("triton", "eager", "copy"))
    inplace = [r for r in summary if r["provider"] == "triton in-place"]
    kept = fwd["kept_pairs"]
    assert [r["of_copy"] for r in inplace] == pytest.approx([2 * kept[T] / 16 for T in (16, 40)])


def test_eager_baseline_is_hope():
    "The benchmark's eager rotate-half baseline, with HoPE's cos/sin tables, computes HoPE."
    from lmcourse.hope import hf_cos_sin, rotate_half_rotary
    g = torch.Generator().manual_seed(fresh_seed())
    q, k = torch.randn(2, 3, 29, 32, generator=g), torch.randn(2, 1, 29, 32, generator=g)
    pos = torch.arange(29) + 300
    cos, sin = hf_cos_sin(pos, 32, 6)
    q_rot, k_rot = rotate_half_rotary(q, k, cos, sin)
    assert_close(q_rot, apply_hope(q.double(), pos, 6), 1e-6)
    assert_close(k_rot, apply_hope(k.double(), pos, 6), 1e-6)


def test_retrieval_experiment_holds_for_a_fresh_seed():
    "Experiment 1 of the chapter with a seed nobody chose: HoPE extrapolates both tasks, RoPE does not, NoPE has no offset."
    from lmcourse.hope import ENCODINGS, RETRIEVAL_TASKS, retrieval_accuracy, train_retrieval
    seed = fresh_seed()
    heads = {(task, kind): train_retrieval(kind, task, seed=seed) for task in RETRIEVAL_TASKS for kind in ENCODINGS}
    a = {(t, k, f): retrieval_accuracy(h, t, 32 * f, 32, seed=seed + 1) for (t, k), h in heads.items() for f in (1, 4)}
    assert all(a[t, k, 1] >= 0.95 for t, k in heads if (t, k) != ("offset", "nope")), (seed, a)
    assert a["offset", "nope", 1] < 0.2, (seed, a)
    assert a["match", "hope", 4] >= 0.95 and a["match", "nope", 4] >= 0.95 and a["match", "rope", 4] <= 0.9, (seed, a)
    assert a["offset", "hope", 4] >= 0.8 and a["offset", "rope", 4] <= 0.1, (seed, a)
