"""Tests of `lmcourse.recall`: the data (prompts, noisy facts, the answer metric), the closed-form MLP decomposition
against an independent solve, the intercept's cosine, the logit lens, the measurements on an lmcourse model and
tiny random-init Hugging Face Llama and GPT-2 models, offline; and the two Triton kernels (head attribution, the
decomposition's moments) against float64 references at the interpreter's and the GPU's tiles."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch

from lmcourse.data import knowledge_base
from lmcourse.interp import HookedHF, activations_at, anatomy, direct_logit_attribution
from lmcourse.model import ModelConfig, Transformer
from lmcourse.recall import (MAX_HEAD_DIM, MAX_MOMENT_INPUTS, analyse_recall, answer_weights, compile_cases,
                             decompose_mlp, decomposition_moments, decomposition_moments_ref, fit_mlp_decomposition,
                             head_attribution, head_attribution_ref, head_attribution_simple, head_logit_attribution,
                             layer_inputs, lens_curve, noisy_facts, object_prior, recall_prompts, span_cosine)
from lmcourse.testing import (LaunchError, assert_close, capture_launches, fresh_seed, gpu_tiles, kernel_device,
                              kernel_dtypes, poisoned_outputs, random_tensors, tolerance)

KB = knowledge_base(n_subjects=10, n_relations=2, n_objects=5, object_zipf=1.0)
V = KB.vocab.vocab_size


def models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    return {"lmcourse": lm.double().eval(), "llama": HookedHF(llama.double().eval()), "gpt2": HookedHF(gpt2.double().eval())}


MODELS = models()


def planted(N=40, H=3, d=16, seed=None):
    g = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    heads = torch.randn(N, H, d, generator=g, dtype=torch.float64)
    resid = torch.randn(N, d, generator=g, dtype=torch.float64)
    w = torch.randn(H, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    return heads, resid, w, b, g


def test_planted_weights_are_recovered():
    heads, resid, w, b, _ = planted()
    fit = fit_mlp_decomposition(heads, resid, torch.einsum("h,nhd->nd", w, heads) - 0.3 * resid + b)
    torch.testing.assert_close(fit.head_weights, w, rtol=0, atol=1e-8)
    assert abs(fit.resid_weight + 0.3) < 1e-8
    torch.testing.assert_close(fit.intercept, b, rtol=0, atol=1e-8)
    assert fit.rel_error < 1e-10


@pytest.mark.parametrize("N,H,d", [(7, 2, 5), (64, 6, 33)])
def test_closed_form_equals_the_full_least_squares(N, H, d):
    heads, resid, _, _, g = planted(N, H, d)
    y = torch.randn(N, d, generator=g, dtype=torch.float64)
    fit = fit_mlp_decomposition(heads, resid, y)
    design = torch.cat([torch.cat([heads, resid[:, None]], 1).permute(0, 2, 1).reshape(N * d, H + 1),
                        torch.eye(d, dtype=torch.float64).repeat(N, 1)], 1)
    sol = torch.linalg.lstsq(design, y.reshape(N * d, 1)).solution[:, 0]
    torch.testing.assert_close(fit.head_weights, sol[:H], rtol=0, atol=1e-9)
    torch.testing.assert_close(fit.intercept, sol[H + 1:], rtol=0, atol=1e-9)
    err = y - torch.einsum("j,njd->nd", sol[:H + 1], torch.cat([heads, resid[:, None]], 1)) - sol[H + 1:]
    assert abs(fit.rel_error - (err.pow(2).sum(-1).mean().sqrt() / y.norm(dim=-1).mean()).item()) < 1e-9


def test_decomposition_bad_input():
    heads, resid, _, _, _ = planted()
    with pytest.raises(ValueError, match="need heads"):
        fit_mlp_decomposition(heads, resid[:, :4], resid)
    with pytest.raises(ValueError, match="two samples"):
        fit_mlp_decomposition(heads[:1], resid[:1], resid[:1])


def test_span_cosine():
    g = torch.Generator().manual_seed(fresh_seed())
    u_from, u_to, other = torch.randn(3, 20, generator=g, dtype=torch.float64)
    assert abs(span_cosine(3 * (u_to - u_from) + 0 * other, u_to, u_from) - 1) < 1e-9
    assert abs(span_cosine(u_from - u_to, u_to, u_from) + 1) < 1e-9


def test_prompts_and_noisy_facts():
    p = recall_prompts(KB, relation=1, template=2)
    assert p.tokens.shape[0] == 10 and (p.tokens[:, p.subject_pos] == torch.tensor(KB.vocab.encode(" ".join(KB.subjects)))).all()
    assert (p.answers == KB.object_ids[1][KB.table[:, 1]]).all()
    with pytest.raises(ValueError, match="out of range"):
        recall_prompts(KB, relation=2)
    b = noisy_facts(KB, 256, torch.Generator().manual_seed(fresh_seed()), noise=0.0)
    picked = b.targets[b.targets != -100]
    assert len(picked) == 256
    assert (picked == KB.object_ids[b.info["relations"], KB.table[b.info["subjects"], b.info["relations"]]]).all()
    flipped = noisy_facts(KB, 3000, torch.Generator().manual_seed(1), noise=1.0)
    freq = torch.bincount(flipped.info["objects"][flipped.info["relations"] == 0], minlength=5).double()
    torch.testing.assert_close(freq / freq.sum(), object_prior(KB)[0], rtol=0, atol=0.05)   # drawn from the prior
    with pytest.raises(ValueError, match="noise"):
        noisy_facts(KB, 4, torch.Generator(), noise=-0.1)


@pytest.mark.parametrize("family", list(MODELS))
def test_lens_and_decomposition_inputs_on_models(family):
    model = MODELS[family]
    p = recall_prompts(KB)
    curve = lens_curve(model, p.tokens, p.answers)
    own = model(p.tokens)[0][:, -1].float().softmax(-1).gather(1, p.answers[:, None]).mean().item()
    assert abs(curve["p_answer"][-1] - own) < 1e-6 and len(curve["stages"]) == 5
    heads, resid, mlp = layer_inputs(model, p.tokens, 1)
    b_o = anatomy(model).b_o(1)
    _, acts = activations_at(model, p.tokens, ["blocks.1.hook_resid_post"])
    total = resid + heads.sum(1) + (b_o if b_o is not None else 0) + mlp
    torch.testing.assert_close(total, acts["blocks.1.hook_resid_post"], rtol=0, atol=1e-9)
    fit = decompose_mlp(model, p.tokens, 1)
    assert fit.head_weights.shape == (4,) and fit.intercept.shape == (32,) and fit.rel_error >= 0
    with pytest.raises(ValueError, match="layer"):
        layer_inputs(model, p.tokens, 2)
    attr = direct_logit_attribution(model, p.tokens, answer_weights(p.answers, p.candidates, V))
    torch.testing.assert_close(attr.total(), attr.metric, rtol=0, atol=1e-6)


def test_analyse_recall_runs_and_is_consistent():
    model = MODELS["lmcourse"]
    r = analyse_recall(model, KB, relation=0)
    assert len(r["head_effect"]) == 2 and len(r["head_effect"][0]) == 4 and len(r["layers"]) == 2
    l, h = r["top_head"]
    assert r["head_effect"][l][h] == min(min(row) for row in r["head_effect"])
    assert all(0 <= a <= 1 for row in r["attention_to_subject"] for a in row)
    assert 0 <= r["accuracy"] <= 1


# --- the kernels ---------------------------------------------------------------------------------------------------
# Shapes: (B, L, H, D, d). Rows and model width span several blocks at both tile sizes (CPU: 16 rows, 16-wide chunks;
# GPU: 64 rows, 64-wide chunks, 32 in fp32); odd head dims are masked inside BLOCK_D.
ATTRIBUTION_SHAPES = [(1, 1, 1, 16, 16), (37, 2, 3, 24, 150), (70, 1, 2, 40, 200), (130, 2, 1, 64, 96)]


def _attribution_inputs(B, L, H, D, d, dtype=torch.float32, scale=1.0):
    (z, w_o, r), seed = random_tensors([(B, L, H, D), (L, d, H * D), (B, d)], dtype=dtype, device=kernel_device(), scale=scale)
    return z, w_o, r, seed


def _attribution_tol(dtype):
    "r is cast to w_o's dtype for the dot: one more rounding of a 16-bit input than the reference sees."
    return tolerance(dtype, kernel_device()) * (2 if dtype != torch.float32 else 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", ATTRIBUTION_SHAPES)
@pytest.mark.parametrize("tiles", ["cpu", "gpu"])
def test_head_attribution_matches_reference(shape, dtype, tiles):
    z, w_o, r, seed = _attribution_inputs(*shape, dtype=dtype)
    expected = head_attribution_ref(z.double(), w_o.double(), r.to(dtype).double())
    with (gpu_tiles() if tiles == "gpu" else poisoned_outputs()), poisoned_outputs():
        got = head_attribution(z, w_o, r)
    assert got.dtype == torch.float32 and got.shape == shape[:3]
    assert_close(got, expected, _attribution_tol(dtype), seed=seed)


@pytest.mark.gpu
def test_head_attribution_simple_matches_reference():
    z, w_o, r, seed = _attribution_inputs(3, 2, 2, 24, 150)
    with poisoned_outputs():
        got = head_attribution_simple(z, w_o, r)
    assert_close(got, head_attribution_ref(z.double(), w_o.double(), r.double()), seed=seed)


@pytest.mark.gpu
def test_head_attribution_large_magnitudes_and_zeros():
    z, w_o, r, seed = _attribution_inputs(20, 1, 2, 32, 80, scale=1e3)
    z[3] = 0.0
    with poisoned_outputs():
        got = head_attribution(z, w_o, r)
    assert_close(got, head_attribution_ref(z.double(), w_o.double(), r.double()), seed=seed)
    assert (got[3] == 0).all()


def test_head_attribution_launch_choices():
    z, w_o, r = torch.empty(1000, 2, 8, 128, dtype=torch.bfloat16), torch.empty(2, 1024, 1024, dtype=torch.bfloat16), torch.empty(1000, 1024)
    with gpu_tiles():
        (launch,) = capture_launches(lambda: head_attribution(z, w_o, r))
    assert launch.constexprs == {"BLOCK_B": 64, "BLOCK_K": 64, "BLOCK_D": 128} and launch.num_warps == 8
    assert {c.label for c in compile_cases()} >= {"attribution D=64", "attribution D=256", "moments J=64"}


def test_head_attribution_bad_input():
    z, w_o, r, _ = _attribution_inputs(4, 2, 2, 8, 16)
    with pytest.raises(ValueError, match="need z"):
        head_attribution(z[0], w_o, r)
    with pytest.raises(ValueError, match="shapes disagree"):
        head_attribution(z, w_o[:, :, :15], r)
    with pytest.raises(LaunchError, match="share a dtype"):
        head_attribution(z, w_o.half(), r)
    with pytest.raises(LaunchError, match="supports float32"):
        head_attribution(z.double(), w_o.double(), r)
    with pytest.raises(LaunchError, match=f"limit of {MAX_HEAD_DIM}"):
        head_attribution(*(torch.empty(s, device=z.device) for s in ((1, 1, 1, 2 * MAX_HEAD_DIM), (1, 4, 2 * MAX_HEAD_DIM), (1, 4))))
    with pytest.raises(LaunchError, match="not meta"):
        head_attribution(z.to("meta"), w_o.to("meta"), r.to("meta"))
    if kernel_device().type == "cpu":
        with pytest.raises(LaunchError, match="bfloat16"):
            head_attribution(z.bfloat16(), w_o.bfloat16(), r)


@pytest.mark.parametrize("family", list(MODELS))
def test_head_logit_attribution_equals_direct_logit_attribution(family):
    model = MODELS[family]
    p = recall_prompts(KB)
    c = answer_weights(p.answers, p.candidates, V)
    positions = torch.randint(0, p.tokens.shape[1], (p.tokens.shape[0],), generator=torch.Generator().manual_seed(fresh_seed()))
    expected = direct_logit_attribution(model, p.tokens, c, positions).heads
    assert_close(head_logit_attribution(model, p.tokens, c, positions), expected)


MOMENT_SHAPES = [(2, 1, 16), (45, 5, 100), (300, 33, 70)]   # (N, J, d): several chunks, several samples per range


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", MOMENT_SHAPES)
@pytest.mark.parametrize("tiles", ["cpu", "gpu"])
def test_moments_match_reference(shape, dtype, tiles):
    """Against float64 on inputs with a large common mean (30 and -10, spread 1): without the shift, fp32 sums of
    squares would lose the centred Gram matrix to cancellation. The moments are sums of products of the inputs
    as stored, so the reference sees the same rounded inputs."""
    (x, y), seed = random_tensors([shape, (shape[0], shape[2])], device=kernel_device())
    x, y = (x + 30).to(dtype), (y - 10).to(dtype)
    expected = decomposition_moments_ref(x, y)
    with (gpu_tiles() if tiles == "gpu" else poisoned_outputs()), poisoned_outputs():
        got = decomposition_moments(x, y)
    for name, g, e in zip(("G", "rho", "x_mean", "y_mean"), got, expected):
        assert g.dtype == torch.float64
        assert_close(g.float(), e, tolerance(torch.float32, "cpu") * 10, name=name, seed=seed)


def test_fit_through_the_kernel_equals_the_float64_fit():
    heads, resid, w, b, g = planted(N=60, H=4, d=50)
    y = torch.einsum("h,nhd->nd", w, heads) + 0.4 * resid + b + 0.3 * torch.randn(60, 50, generator=g, dtype=torch.float64)
    ref = fit_mlp_decomposition(heads, resid, y)
    got = fit_mlp_decomposition(heads.float().to(kernel_device()), resid.float().to(kernel_device()),
                                y.float().to(kernel_device()), kernel=True)
    torch.testing.assert_close(got.head_weights.cpu(), ref.head_weights, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.intercept.cpu(), ref.intercept, rtol=0, atol=1e-4)
    assert abs(got.rel_error - ref.rel_error) < 1e-4


def test_moments_bad_input():
    x, y = torch.randn(4, 3, 16, device=kernel_device()), torch.randn(4, 16, device=kernel_device())
    with pytest.raises(ValueError, match="need x"):
        decomposition_moments(x, y[:, :8])
    with pytest.raises(LaunchError, match="share a dtype"):
        decomposition_moments(x, y.half())
    with pytest.raises(LaunchError, match="supports float32"):
        decomposition_moments(x.double(), y.double())
    with pytest.raises(LaunchError, match=f"limit of {MAX_MOMENT_INPUTS}"):
        decomposition_moments(torch.empty(2, MAX_MOMENT_INPUTS + 1, 16, device=x.device), torch.empty(2, 16, device=x.device))
