"""Tests of `lmcourse.batch_icl`: the linear-attention identities, the exact identities of Batch-ICL (order invariance,
N = 1 at the last layer is 1-shot, no replacement is zero-shot, one packed launch equals the N + 1 separate passes)
for `lmcourse.model` — on the default attention and through the Cog chapter's Triton kernel — and for Hugging Face
Llama and Qwen2 models (tiny, random, offline), the cost model, the Bayes ceiling, and the experiment's machinery."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import itertools
import math
from dataclasses import replace

import pytest
import torch

from lmcourse.batch_icl import (Episodes, HFAdapter, PackedLaunch, ToyConfig, adapter, answer_accuracy, batch_icl_cost,
                                batch_icl_edits, batch_icl_logits, batch_icl_reference, bayes_accuracy,
                                benchmark_batch_icl, causal_linear_stack, copy_positions, evaluate_toy, few_shot_episodes,
                                full_experiment, linear_attention, meta_gradient, n_shot_logits, pack_batch_icl,
                                plot_benchmark, plot_layer_curves, pretrain_toy, prompt_logits, random_episodes,
                                shift_posterior, toy_batches, toy_episodes, toy_orders, toy_summary)
from lmcourse.data import make_task
from lmcourse.model import ModelConfig, Transformer, eager_attention
from lmcourse.testing import fresh_seed, kernel_device

TOL = 1e-4   # relative: fp32 sums in another order, SDPA's masked vs unmasked kernels


def close(a, b, tol=TOL, what=""):
    err = ((a.double() - b.double()).norm() / b.double().norm()).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def scrambled(seed, **cfg):
    "An untrained engine model with weights large enough that attention is sharp and N-shot ICL depends on the order."
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{"vocab_size": 22, "d_model": 64, "n_layers": 3, "n_heads": 4, "max_seq_len": 1024, **cfg}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1: p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    seed = fresh_seed()
    print("seed", seed)
    model = scrambled(seed, n_kv_heads=2)
    ep = few_shot_episodes(6, n_shots=4, seed=seed, rule="shift", label_noise=0.25)
    return model, ep, len(model.blocks)


# -- the math -------------------------------------------------------------------------------------------------
def test_linear_attention_is_zero_shot_weights_plus_meta_gradient():
    g = torch.Generator().manual_seed(fresh_seed())
    d = 7
    w_k, w_v = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    demos = [torch.randn(3, d, generator=g, dtype=torch.float64) for _ in range(5)]
    query = torch.randn(2, d, generator=g, dtype=torch.float64)
    q = query[-1]
    kv = lambda x: (x @ w_k.T, x @ w_v.T)
    w_zs = meta_gradient(*kv(query))
    dws = [meta_gradient(*kv(x)) for x in demos]
    n_shot = linear_attention(q, *kv(torch.cat([*demos, query])))
    assert torch.allclose(n_shot, (w_zs + sum(dws)) @ q, atol=1e-9)                   # N-shot: the sum of updates
    one_shot = torch.stack([linear_attention(q, *kv(torch.cat([x, query]))) for x in demos])
    mean_dw = torch.stack(dws).mean(0)
    assert torch.allclose(one_shot.mean(0), (w_zs + mean_dw) @ q, atol=1e-9)          # Batch-ICL: their mean
    for alpha in (0.0, 0.7, -0.3):                                                    # α scales the averaged update
        assert torch.allclose((1 + alpha) * one_shot.mean(0) - alpha * w_zs @ q, w_zs @ q + (1 + alpha) * mean_dw @ q, atol=1e-9)


def test_order_matters_from_the_second_causal_layer_on():
    g = torch.Generator().manual_seed(fresh_seed())
    d = 6
    w = [torch.randn(d, d, generator=g, dtype=torch.float64) * 0.2 for _ in range(4)]
    demos = [torch.randn(2, d, generator=g, dtype=torch.float64) for _ in range(3)]
    query = torch.randn(2, d, generator=g, dtype=torch.float64)
    def last(order, layers):
        return causal_linear_stack(torch.cat([*(demos[i] for i in order), query]), w[:layers], w[2:2 + layers])[-1]
    outs1 = torch.stack([last(o, 1) for o in itertools.permutations(range(3))])
    outs2 = torch.stack([last(o, 2) for o in itertools.permutations(range(3))])
    assert torch.allclose(outs1, outs1[:1].expand_as(outs1), atol=1e-9)
    assert (outs2 - outs2[:1]).abs().max() > 1e-3
    # causal_linear_stack against a loop over positions
    x = torch.cat([*demos, query])
    k, v = x @ w[0].T, x @ w[2].T
    ref = torch.stack([x[t] + sum((k[s] @ x[t]) * v[s] for s in range(t + 1)) for t in range(len(x))])
    assert torch.allclose(causal_linear_stack(x, w[:1], w[2:3]), ref, atol=1e-9)


# -- episodes -------------------------------------------------------------------------------------------------
def test_few_shot_episodes_reassemble_the_task():
    seed = fresh_seed()
    ep = few_shot_episodes(5, n_shots=3, seed=seed, rule="shift", n_classes=3, label_noise=0.2)
    b = make_task("few_shot", 5, seed=seed, n_shots=3, rule="shift", n_classes=3, label_noise=0.2)
    assert torch.equal(ep.prompt(), b.inputs)
    assert torch.equal(ep.labels, b.targets[:, b.info["query_pos"]])
    assert ep.n_shots == 3 and ep.query.shape == (5, 2) and ep.zero_shot().shape == (5, 3)
    assert torch.equal(ep.one_shot(1), torch.cat([b.inputs[:, :1], b.inputs[:, 5:9], b.inputs[:, -2:]], 1))
    assert torch.equal(ep.permuted([2, 0, 1]).prompt(), ep.prompt([2, 0, 1]))
    assert ep.subset(slice(1, 3)).batch_size == 2
    logits = torch.zeros(5, 2, 30)
    logits[torch.arange(5), :, ep.labels] = 1.0
    logits[0, 1] = 0; logits[0, 1, ep.candidates[(ep.candidates != ep.labels[0]).nonzero()[0, 0]]] = 1.0
    assert torch.allclose(answer_accuracy(logits, ep), torch.tensor([1.0, 0.8]))


def test_episodes_reject_bad_parts():
    ok = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="integer token ids"):
        Episodes(ok, [ok.float()], ok)
    with pytest.raises(ValueError, match="integer token ids"):
        Episodes(ok, [torch.zeros(3, 3, dtype=torch.long)], ok)
    with pytest.raises(ValueError, match="answer cue"):
        Episodes(ok, [ok], ok[:, :0])
    with pytest.raises(ValueError, match="at least one demonstration"):
        few_shot_episodes(2, n_shots=0)


def test_positions_natural_and_aligned():
    ep = Episodes(torch.zeros(1, 2, dtype=torch.long), [torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)],
                  torch.zeros(1, 2, dtype=torch.long))
    assert copy_positions(ep, 0).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert copy_positions(ep, 0, align_positions=True).tolist() == [0, 1, 4, 5, 6, 7, 8]
    assert copy_positions(ep, 1, align_positions=True).tolist() == list(range(9))
    assert copy_positions(ep, None, align_positions=True).tolist() == [0, 1, 7, 8]


# -- the identities on lmcourse.model ------------------------------------------------------------------------
def test_no_replacement_is_zero_shot_and_one_demonstration_at_the_last_layer_is_one_shot(setup):
    model, ep, L = setup
    zero = model(ep.zero_shot())[0][:, -1]
    close(batch_icl_reference(model, ep, L), zero, 1e-6)
    close(batch_icl_logits(model, ep, [L])[:, 0], zero)
    for i in range(ep.n_shots):
        one, one_shot = ep.permuted([i]), model(ep.one_shot(i))[0][:, -1]
        for n_cue in (1, 2):
            close(batch_icl_reference(model, one, L - 1, n_cue=n_cue), one_shot, 1e-6)
            close(batch_icl_logits(model, one, [L - 1], n_cue=n_cue)[:, 0], one_shot)
    # and not at an earlier layer: the identity is not a tautology
    assert (batch_icl_reference(model, ep.permuted([0]), 0) - model(ep.one_shot(0))[0][:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("epochs,n_cue,align,alpha", [(1, 2, False, 0.0), (1, 1, True, 0.0), (2, 2, False, 0.0),
                                                      (3, 1, False, 0.5), (2, 2, True, -0.5)])
def test_packed_launch_equals_separate_passes(setup, epochs, n_cue, align, alpha):
    model, ep, L = setup
    kw = dict(epochs=epochs, n_cue=n_cue, align_positions=align, alpha=alpha)
    packed = batch_icl_logits(model, ep, **kw)
    assert packed.shape == (ep.batch_size, L + 1, 22)
    close(packed, torch.stack([batch_icl_reference(model, ep, k, **kw) for k in range(L + 1)], 1))
    close(batch_icl_logits(model, ep, [2, 0], **kw, chunk=4), packed[:, [2, 0]])   # any layers, any chunking


def test_packed_launch_with_demonstrations_of_different_lengths(setup):
    model, ep, L = setup
    ragged = replace(ep, demos=[ep.demos[0][:, :3], torch.cat([ep.demos[1], ep.demos[2]], 1), ep.demos[3]])
    for epochs, align in ((1, False), (2, True)):
        close(batch_icl_logits(model, ragged, epochs=epochs, align_positions=align),
              torch.stack([batch_icl_reference(model, ragged, k, epochs=epochs, align_positions=align) for k in range(L + 1)], 1))


def test_order_invariance(setup):
    model, ep, L = setup
    orders = list(itertools.permutations(range(4)))[::5]
    for epochs in (1, 2):
        base = batch_icl_logits(model, ep, epochs=epochs)
        for o in orders:
            close(batch_icl_logits(model, ep.permuted(o), epochs=epochs), base, 1e-5)
        close(batch_icl_reference(model, ep.permuted(orders[-1]), 1, epochs=epochs), base[:, 1], 1e-5)
    n_shot = n_shot_logits(model, ep, orders)                    # the model itself is order-sensitive
    assert (n_shot - n_shot[:, :1]).abs().max() > 1e-1


def test_the_replacement_only_touches_the_zero_shot_copy(setup):
    model, ep, L = setup
    launch = pack_batch_icl(ep, [0, 1], epochs=2)
    m = adapter(model)
    seen, edits = {}, batch_icl_edits(launch, L)
    first_round = torch.arange(launch.tokens.shape[1]) <= launch.one_shot_rows[0].max()
    def last_layer(h, edit):
        seen["edited" if edit else "plain"] = out = edits[L - 1](h) if edit else h
        return out
    with m.edit({L - 1: lambda h: last_layer(h, False)}):
        m.logits(launch.tokens, [0], segment_ids=launch.segment_ids, positions=launch.positions)
    with m.edit({**edits, L - 1: lambda h: last_layer(h, True)}):
        m.logits(launch.tokens, [0], segment_ids=launch.segment_ids, positions=launch.positions)
    one_shot_part = first_round
    assert torch.equal(seen["plain"][:, one_shot_part], seen["edited"][:, one_shot_part])
    assert not torch.equal(seen["plain"], seen["edited"])


def test_pack_layout():
    ep = few_shot_episodes(2, n_shots=2, seed=0, rule="shift")
    launch = pack_batch_icl(ep, [1, 3], epochs=2, n_cue=2)
    assert isinstance(launch, PackedLaunch) and launch.tokens.shape == (2, 4 * 7 + 2 * 3)
    assert launch.segment_ids[0].tolist() == [s for s in range(4) for _ in range(7)] + [4] * 3 + [5] * 3
    assert launch.positions.tolist() == list(range(7)) * 4 + [0, 1, 2] * 2
    assert launch.one_shot_rows.tolist() == [[[5, 6], [12, 13]], [[19, 20], [26, 27]]]
    assert launch.zero_shot_rows.tolist() == [[29, 30], [32, 33]]
    assert torch.equal(launch.tokens[:, 7:14], ep.one_shot(1)) and torch.equal(launch.tokens[:, 28:31], ep.zero_shot())


def test_bad_arguments(setup):
    model, ep, L = setup
    with pytest.raises(ValueError, match="layer must lie"):
        batch_icl_reference(model, ep, L + 1)
    with pytest.raises(ValueError, match="layers must lie"):
        batch_icl_logits(model, ep, [-1])
    with pytest.raises(ValueError, match="cue tokens"):
        batch_icl_logits(model, ep, n_cue=3)
    with pytest.raises(ValueError, match="epochs"):
        batch_icl_reference(model, ep, 0, epochs=0)
    with pytest.raises(ValueError, match="at least one layer"):
        pack_batch_icl(ep, [])
    with pytest.raises(TypeError, match="lmcourse Transformer or a Hugging Face"):
        batch_icl_logits(torch.nn.Linear(2, 2), ep)


# -- the packed launch through other attention kernels --------------------------------------------------------
@pytest.mark.gpu
def test_packed_launch_through_the_cog_kernel_and_flex_equals_eager_separate_passes():
    from lmcourse.cog import make_attention_fn
    from lmcourse.model import sdpa_attention
    device = kernel_device()
    seed = fresh_seed()
    base = scrambled(seed, n_kv_heads=2)
    ep = few_shot_episodes(3, n_shots=3, seed=seed, rule="shift", label_noise=0.3).to(device)
    eager = Transformer(base.cfg, attention=eager_attention).to(device).eval()
    eager.load_state_dict(base.state_dict())
    reference = torch.stack([batch_icl_reference(eager, ep, k, epochs=2) for k in range(4)], 1)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    attentions = {"cog triton (softmax)": make_attention_fn(signed=False, backend="triton")}
    if device.type == "cuda":
        attentions["sdpa_attention (flex on cuda)"] = sdpa_attention
    for name, attention in attentions.items():
        for dtype in dtypes:
            model = Transformer(base.cfg, attention=attention).to(device).eval()
            model.load_state_dict(base.state_dict())
            model.to(dtype)
            tol = 5e-3 if device.type == "cuda" and dtype == torch.float32 else (3e-2 if dtype == torch.bfloat16 else TOL)
            close(batch_icl_logits(model, ep, epochs=2).float(), reference, tol, f"{name}, {dtype}, seed {seed}")


# -- Hugging Face ---------------------------------------------------------------------------------------------
def hf_models():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(fresh_seed())
    return {"llama": LlamaForCausalLM(LlamaConfig(**common)).eval(), "qwen2": Qwen2ForCausalLM(Qwen2Config(**common)).eval()}


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_hugging_face_identities(name):
    model = hf_models()[name]
    L = model.config.num_hidden_layers
    ep = random_episodes(3, 4, 5, instruction_len=3, query_len=2, vocab_size=128, seed=fresh_seed())
    for epochs in (1, 2):
        packed = batch_icl_logits(model, ep, epochs=epochs)
        close(packed, torch.stack([batch_icl_reference(model, ep, k, epochs=epochs) for k in range(L + 1)], 1))
        close(batch_icl_logits(model, ep.permuted([2, 3, 1, 0]), epochs=epochs), packed, 1e-5)
    with torch.no_grad():
        close(packed[:, L], model(ep.zero_shot()).logits[:, -1])
        one = ep.permuted([1])
        close(batch_icl_logits(model, one, [L - 1])[:, 0], model(one.one_shot(0)).logits[:, -1])
        close(prompt_logits(model, ep.prompt()), model(ep.prompt()).logits[:, -1])
        assert (n_shot_logits(model, ep, [(0, 1, 2, 3), (3, 2, 1, 0)]).diff(dim=1)).abs().max() > 0


def test_hugging_face_edit_leaves_other_rows_bit_for_bit():
    model = hf_models()["llama"]
    tokens = torch.randint(0, 128, (2, 9))
    m = adapter(model)
    with torch.no_grad():
        plain = m.logits(tokens, list(range(9)))
        with m.edit({1: lambda h: h.clone()}):                      # an edit that changes nothing
            same = m.logits(tokens, list(range(9)))
        with m.edit({1: lambda h: None}):
            kept = m.logits(tokens, list(range(9)))
        def bump(h):
            h = h.clone(); h[:, 4] += 1.0
            return h
        with m.edit({1: bump}):
            bumped = m.logits(tokens, list(range(9)))
    assert torch.equal(plain, same) and torch.equal(plain, kept)
    assert torch.equal(plain[:, :4], bumped[:, :4]) and not torch.equal(plain[:, 4:], bumped[:, 4:])


def test_hugging_face_adapter_refuses_other_layouts():
    model = hf_models()["llama"]
    del model.model.layers[0].post_attention_layernorm
    with pytest.raises(TypeError, match="post_attention_layernorm"):
        HFAdapter(model)
    model = hf_models()["llama"]
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4-D mask"):
        HFAdapter(model)


# -- cost model, Bayes ceiling --------------------------------------------------------------------------------
def test_cost_model():
    for N, tokens, pairs in ((4, 2.0, 0.83), (16, 2.23, 0.30), (64, 2.31, 0.08)):   # the paper notes' numbers
        c = batch_icl_cost(20, 60, 60, N)
        assert abs(c["token_ratio"] - tokens) < 0.01 and abs(c["pair_ratio"] - pairs) < 0.01
    c = batch_icl_cost(2, 3, 4, 5, epochs=2, zero_shot_copies=3)
    assert c["n_shot"] == {"tokens": 21, "pairs": 231}
    assert c["batch_icl"] == {"tokens": 2 * 5 * 9 + 3 * 6, "pairs": 2 * 5 * 45 + 3 * 21}
    ep = random_episodes(1, 5, 3, instruction_len=2, query_len=4)
    assert pack_batch_icl(ep, [0, 1, 2], epochs=2).tokens.shape[1] == c["batch_icl"]["tokens"]


def test_bayes_ceiling():
    seed = fresh_seed()
    p = 0.15
    ep = few_shot_episodes(20_000, n_shots=4, seed=seed, rule="shift", label_noise=p)
    majority = (1 - p) ** 4 + 4 * p * (1 - p) ** 3 + 0.5 * 6 * p ** 2 * (1 - p) ** 2
    assert abs(bayes_accuracy(ep) - majority) < 0.01
    post = shift_posterior(ep)
    assert torch.allclose(post.sum(1), torch.ones(len(post), dtype=torch.float64))
    assert bayes_accuracy(few_shot_episodes(300, n_shots=1, seed=seed, rule="shift", n_classes=5)) == 1.0
    # a prior: with 2–2 votes the default mapping wins; more accurate than the uniform prior's coin
    prior = few_shot_episodes(20_000, n_shots=4, seed=seed, rule="shift", label_noise=p, shift_probs=(0.7, 0.3))
    assert abs(bayes_accuracy(prior) - (majority + 0.2 * 6 * p ** 2 * (1 - p) ** 2)) < 0.01
    with pytest.raises(ValueError, match="'shift' rule"):
        shift_posterior(few_shot_episodes(4, n_shots=2, rule="map"))


# -- the experiment's machinery (tiny sizes; the effect itself is asserted in the notebook) -------------------
TINY = ToyConfig(n_layers=2, d_model=32, n_heads=2, steps=4, batch_size=4, warmup_steps=1, n_val=16, n_test=16, n_orders=3)


def test_toy_data_orders_and_splits():
    get_batch = toy_batches(TINY)
    g = torch.Generator().manual_seed(0)
    lengths = set()
    for _ in range(30):
        b = get_batch("train", g)
        assert b.inputs.shape[0] == 4 and (b.inputs.shape[1] - 3) % 4 == 0 and b.inputs.shape[1] <= 4 * 8 + 3
        lengths.add(b.inputs.shape[1])
    assert len(lengths) > 3
    orders = toy_orders(TINY, 0)
    assert len(orders) == 3 == len(set(orders)) and all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len(toy_orders(replace(TINY, n_orders=None), 0)) == 24
    val, test = toy_episodes(TINY, "val"), toy_episodes(TINY, "test")
    assert not torch.equal(val.prompt(), test.prompt()[:16])
    assert torch.equal(toy_episodes(TINY, "test", label_noise=0.0).labels, test.labels)
    with pytest.raises(ValueError, match="split"):
        toy_episodes(TINY, "train")


def test_toy_pipeline_runs_end_to_end():
    model, hist = pretrain_toy(TINY, seed=0, device="cpu")
    assert len(hist.train_loss) == 4 and not model.training
    run = evaluate_toy(model, TINY)
    assert len(run["n_shot"]) == 3 and len(run["one_shot"]) == 4 and set(run["epochs"]) == {1, 2}
    for r in run["epochs"].values():
        assert len(r["val"]) == len(r["test"]) == 3 and r["accuracy"] == r["test"][r["layer"]]
        assert r["layer"] == max(range(3), key=r["val"].__getitem__)
    row = toy_summary(dict(seed=0, **run))
    assert row["n_shot_min"] <= row["n_shot_mean"] <= row["n_shot_max"]
    plot_layer_curves([dict(seed=0, **run)])
    clock = iter([100.0, 100.0, 0.0, 0.0])
    full = full_experiment(seeds=(0, 1), regimes=("clean", "noisy"), n_shots=(2,), cfg=TINY, device="cpu",
                           seconds_left=lambda: next(clock), seconds_per_model=10)
    assert [(r["regime"], r["seed"]) for r in full["runs"]] == [("clean", 0), ("clean", 1)]
    assert full["skipped"] == ["noisy seed 0", "noisy seed 1"]


def test_benchmark_needs_a_gpu_and_its_plot_reads_stored_rows():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            benchmark_batch_icl()
    rows = [dict(n_shots=N, demo_len=D, provider=p, ms=float(N * D), peak_mib=float(N)) for N in (2, 4) for D in (32, 256)
            for p in ("N-shot (one prompt)", "Batch-ICL packed (FlexAttention)")]
    rows.append(dict(n_shots=8, demo_len=32, provider="N-shot (one prompt)", ms=None, error="OutOfMemoryError"))
    fig = plot_benchmark({"rows": rows, "env": {"device": "test", "date": "2026-01-01"}})
    assert len(fig.axes[0].lines) == 4
    assert math.isclose(fig.axes[0].lines[0].get_ydata()[-1], 4 * 32)
