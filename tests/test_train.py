"""Training: profiles, schedule, a run that learns, checkpoints, gradient accumulation, exact resume, callbacks,
the model loss_fn sees, host syncs, the throughput window, and DDP on gloo with two processes."""
import functools
import os
import random
import sys
import tempfile
from dataclasses import replace
from types import SimpleNamespace

import lmcourse  # noqa: F401
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmcourse.data import Batch, make_task
from lmcourse.model import ModelConfig, Transformer
from lmcourse.train import (Callback, History, ModelProxy, TrainConfig, by_profile, current_profile, load_checkpoint,
                            lr_at, save_checkpoint, train)


def test_profiles(monkeypatch):
    monkeypatch.delenv("LMCOURSE_PROFILE", raising=False)
    assert current_profile() == "smoke" and by_profile(smoke=1, full=2) == 1
    monkeypatch.setenv("LMCOURSE_PROFILE", "full")
    assert by_profile(smoke=1, full=2) == 2
    monkeypatch.setenv("LMCOURSE_PROFILE", "medium")
    with pytest.raises(ValueError, match="is not a profile"):
        current_profile()


def test_schedule_and_config_validation():
    cfg = TrainConfig(steps=50, warmup_steps=5, lr=2.0, min_lr_ratio=0.25)
    lrs = [lr_at(s, cfg) for s in range(50)]
    assert lrs[4] == pytest.approx(2.0) and max(lrs) == pytest.approx(2.0)
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:5])) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert lr_at(50, cfg) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=11)
    for bad in (dict(grad_accum_steps=0), dict(log_every=0), dict(eval_every=0)):
        with pytest.raises(ValueError, match="must be positive"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="needs a checkpoint_path"):
        TrainConfig(checkpoint_every=5)
    watched = TrainConfig(log_every=3, timing_warmup=0, checkpoint_path="x.pt", checkpoint_every=2, progress=False)
    assert watched.identity() == TrainConfig().identity()
    assert TrainConfig(grad_accum_steps=2).identity() != TrainConfig().identity()


def copy_batches(split, g):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g)) + (0 if split == "train" else 10**9)
    return make_task("copy", 16, seed=seed, length=6, vocab_size=12, min_length=6, max_prefix=0)   # fixed layout


T = copy_batches("train", torch.Generator()).inputs.shape[1]      # tokens per sequence


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=12, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))


def test_training_learns_and_checkpoint_round_trips():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=12, d_model=48, n_layers=2, n_heads=4, max_seq_len=16))
    cfg = TrainConfig(steps=120, lr=3e-3, warmup_steps=10, eval_every=40, progress=False)
    hist = train(model, copy_batches, cfg, loss_fn=lambda m, b: (m(b.inputs, b.targets)[1], {"one": 1.0}))
    assert hist.val_loss[-1] < 0.4 * hist.val_loss[0]
    assert len(hist.train_loss) == 120 and hist.metrics["one"] == [1.0] * 120 and hist.tokens_per_s > 0
    assert hist.metric_steps["one"] == hist.steps == list(range(120))
    assert hist.config["steps"] == 120 and hist.tokens == 120 * 16 * T and hist.device == "cpu"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.pt")
        save_checkpoint(path, model, step=120, history=hist)
        other = Transformer(ModelConfig(**load_checkpoint(path)["config"]))
        state = load_checkpoint(path, other)
        assert os.listdir(d) == ["m.pt"]                     # the temporary file is gone
    x = copy_batches("val", torch.Generator().manual_seed(1)).inputs
    torch.testing.assert_close(other(x)[0], model.cpu()(x)[0])
    assert History.from_dict(state["history"]).val_loss == hist.val_loss


def test_training_batches_carry_the_loops_step_and_evaluation_batches_none():
    seen = []
    def loss_fn(m, b):
        seen.append((m.training, {k: b.info.get(k) for k in ("step", "steps", "micro_step", "micro_steps")}))
        return m(b.inputs, b.targets)[1], {}
    cfg = TrainConfig(steps=3, warmup_steps=0, grad_accum_steps=2, eval_every=10, eval_batches=1, progress=False)
    train(_tiny(), copy_batches, cfg, loss_fn=loss_fn, device="cpu")
    stamps = [info for training, info in seen if training]
    assert stamps == [dict(step=s, steps=3, micro_step=m, micro_steps=2) for s in range(3) for m in range(2)]
    assert all(info["step"] is None for training, info in seen if not training)   # evaluate(): no stamp, model in eval


# ---- gradient accumulation: k micro-batches take the step of one batch k times larger ---------------------

def _micro_batches(n):
    return [make_task("copy", 4, seed=300 + i, length=6, vocab_size=12, min_length=6, max_prefix=0)   # equal target counts
            for i in range(n)]


def _joined(batches):
    return Batch(torch.cat([b.inputs for b in batches]), torch.cat([b.targets for b in batches]))


def _capture_grads(monkeypatch):
    "Record the gradients AdamW receives at every step."
    captured, step = [], torch.optim.AdamW.step
    def spy(opt, *args, **kwargs):
        captured.append([p.grad.clone() for group in opt.param_groups for p in group["params"]])
        return step(opt, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return captured


@pytest.mark.parametrize("k", [2, 4])
def test_grad_accumulation_equals_one_large_batch(monkeypatch, k):
    steps = 3
    micro = _micro_batches(steps * k)
    # no clipping: the optimizer must see the raw accumulated gradient (clipping both to norm 1 would hide a wrong scale)
    cfg = TrainConfig(steps=steps, warmup_steps=1, lr=1e-2, eval_every=10, eval_batches=1, grad_clip=0, progress=False)
    grads = _capture_grads(monkeypatch)
    calls = iter(micro)
    accum = _tiny()
    h_accum = train(accum, lambda split, g: next(calls) if split == "train" else micro[0], replace(cfg, grad_accum_steps=k),
                    device="cpu")
    g_accum = grads[:]
    grads.clear()
    big_batches = iter(_joined(micro[i:i + k]) for i in range(0, len(micro), k))
    single = _tiny()
    h_single = train(single, lambda split, g: next(big_batches) if split == "train" else micro[0], cfg, device="cpu")
    assert len(g_accum) == len(grads) == steps
    for step, (step_a, step_s) in enumerate(zip(g_accum, grads)):
        for a, s in zip(step_a, step_s):
            # the gradient itself, not only the update (AdamW hardly sees a gradient k times too large); after the
            # first step the weights differ by rounding, and so do the gradients, a little more
            assert (a - s).norm() <= (1e-5 if step == 0 else 1e-4) * s.norm()
            torch.testing.assert_close(a, s, rtol=1e-4, atol=1e-6)
    for a, s in zip(accum.parameters(), single.parameters()):   # Adam amplifies rounding where a gradient is ~0: norm-wise
        assert (a - s).norm() <= 1e-4 * s.norm()
        torch.testing.assert_close(a, s, rtol=1e-4, atol=3e-5 * cfg.lr / 1e-2)
    assert h_accum.train_loss == pytest.approx(h_single.train_loss, rel=1e-5)   # logged loss: the mean over micro-batches
    assert h_accum.tokens == h_single.tokens == steps * k * 4 * T


# ---- no host sync in the step; log_every changes nothing ----------------------------------------------------

def test_log_every_changes_no_result():
    runs = []
    for log_every in (1, 7, 100):
        model = _tiny()
        cfg = TrainConfig(steps=20, warmup_steps=2, eval_every=8, eval_batches=1, log_every=log_every, progress=False)
        hist = train(model, copy_batches, cfg, lambda m, b: (m(b.inputs, b.targets)[1], {"acc": torch.ones(())}), "cpu")
        runs.append((model, hist))
    (m0, h0), *rest = runs
    for m, h in rest:
        assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), m.parameters()))
        assert (h.train_loss, h.val_loss, h.metrics, h.steps) == (h0.train_loss, h0.val_loss, h0.metrics, h0.steps)


def test_the_loop_copies_to_the_host_once_per_log_every(monkeypatch):
    "Only the loop's own calls are counted (CPU AdamW reads its step counters with .item(); fused CUDA AdamW does not)."
    calls = []
    def counting(name):
        original = getattr(torch.Tensor, name)
        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == "lmcourse.train": calls.append(name)
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        counting(name)
    cfg = TrainConfig(steps=20, warmup_steps=2, eval_every=100, eval_batches=1, log_every=5, progress=False)
    train(_tiny(), copy_batches, cfg, lambda m, b: (m(b.inputs, b.targets)[1], {"acc": torch.ones(())}), "cpu")
    # evaluations after steps 0 and 19 (one .item() each); copies after step 0 (before its evaluation) and steps 4, 9, 14, 19
    assert sorted(calls) == ["item"] * 2 + ["tolist"] * 5, calls


def test_metrics_must_be_scalars():
    cfg = TrainConfig(steps=2, warmup_steps=0, progress=False)
    with pytest.raises(ValueError, match="must be a scalar"):
        train(_tiny(), copy_batches, cfg, lambda m, b: (m(b.inputs, b.targets)[1], {"v": torch.ones(3)}), "cpu")


# ---- the throughput window ------------------------------------------------------------------------------------

def test_throughput_window_excludes_warmup_evaluation_and_callbacks(monkeypatch):
    "A fake clock that only training batches (1 s), validation batches (100 s) and callbacks (1000 s) advance."
    import lmcourse.train as train_module
    clock = [0.0]
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    def timed_batches(split, g):
        clock[0] += 1.0 if split == "train" else 100.0
        return copy_batches(split, g)
    def callback(step, model, history): clock[0] += 1000.0
    cfg = TrainConfig(steps=10, warmup_steps=1, eval_every=3, eval_batches=2, timing_warmup=4, progress=False)
    hist = train(_tiny(), timed_batches, cfg, device="cpu", callbacks=[Callback(every=3, fn=callback)])
    assert hist.val_steps == [0, 2, 5, 8, 9] and hist.timed_steps == 6          # steps 4..9
    assert hist.timed_seconds == 6.0                                              # one training batch per timed step
    assert hist.seconds == 10 + 5 * (2 * 100.0 + 1000.0)
    assert hist.tokens_per_s_per_device == 6 * 16 * T / 6.0
    assert hist.tokens_per_s == hist.tokens_per_s_per_device and hist.world_size == 1
    short = train(_tiny(), timed_batches, replace(cfg, steps=3, timing_warmup=50), device="cpu")
    assert short.timed_steps == 1 and short.timed_seconds == 1.0                 # the window still times the last step
    assert History(device="cpu").mfu() is None


def test_epochs_reported_when_the_data_size_is_known():
    hist = train(_tiny(), copy_batches, TrainConfig(steps=4, warmup_steps=0, progress=False), device="cpu",
                 epoch_tokens=16 * T * 2)
    assert hist.epochs == pytest.approx(2.0)


# ---- callbacks ---------------------------------------------------------------------------------------------

def test_callbacks_run_every_n_steps_on_the_unwrapped_model_and_log_metrics():
    seen = []
    def probe(step, model, history):
        seen.append((step, type(model).__name__, model.training, torch.is_grad_enabled(), len(history.steps)))
        return {"probe": step * 2.0, "probe_t": torch.tensor(step + 0.5)}
    class Counting(Callback):
        def __init__(self): super().__init__(every=4); self.steps = []
        def __call__(self, step, model, history): self.steps.append(step)
    counting = Counting()
    hist = train(_tiny(), copy_batches, TrainConfig(steps=10, warmup_steps=1, eval_every=5, progress=False), device="cpu",
                 callbacks=[Callback(every=3, fn=probe), counting])
    assert [s[0] for s in seen] == [0, 2, 5, 8, 9] and counting.steps == [0, 3, 7, 9]
    assert all(name == "Transformer" and not training and not grad for _, name, training, grad, _ in seen)
    assert [s[4] for s in seen] == [1, 3, 6, 9, 10]                   # the history is complete up to that step
    assert hist.metrics["probe"] == [0.0, 4.0, 10.0, 16.0, 18.0] and hist.metric_steps["probe"] == [0, 2, 5, 8, 9]
    assert hist.metrics["probe_t"] == [0.5, 2.5, 5.5, 8.5, 9.5]
    with pytest.raises(TypeError, match="dict of scalars"):
        train(_tiny(), copy_batches, TrainConfig(steps=2, warmup_steps=0, progress=False), device="cpu",
              callbacks=[Callback(every=1, fn=lambda s, m, h: 1.0)])
    with pytest.raises(TypeError, match="Callback-like"):
        train(_tiny(), copy_batches, TrainConfig(steps=2, warmup_steps=0, progress=False), device="cpu", callbacks=[print])
    with pytest.raises(ValueError, match=">= 1"):
        Callback(every=0, fn=print)


# ---- the model loss_fn sees under torch.compile ----------------------------------------------------------------

def test_compiled_model_reaches_loss_fn_as_a_proxy(monkeypatch):
    "The compile path of the full profile, on CPU: torch.compile with the 'eager' backend (tracing, no code generation)."
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    seen = []
    def loss_fn(m, b):
        seen.append(type(m).__name__)
        _, loss = m(b.inputs, b.targets)
        return loss, {"n_blocks": float(len(m.blocks)), "d": float(m.cfg.d_model)}   # attributes of the model itself
    model, reference = _tiny(), _tiny()
    cfg = TrainConfig(steps=3, warmup_steps=1, eval_every=10, eval_batches=1, progress=False)
    hist = train(model, copy_batches, replace(cfg, compile=True), loss_fn, "cpu")
    train(reference, copy_batches, cfg, loss_fn, "cpu")
    assert seen[0] == "ModelProxy" and hist.metrics["n_blocks"] == [2.0] * 3
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    proxy = ModelProxy(torch.nn.Identity(), model)
    assert proxy.cfg is model.cfg and "Identity around Transformer" in repr(proxy)


# ---- exact resume ------------------------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def _fails_after(n_train_calls, get_batch=copy_batches):
    calls = iter(range(n_train_calls))
    def failing(split, g):
        if split == "train" and next(calls, None) is None: raise Interrupted
        return get_batch(split, g)
    return failing


def _noisy_loss(m, b):
    "Draws from Python's, NumPy's and torch's generators, so each must be restored for the resumed run to match."
    _, loss = m(b.inputs, b.targets)
    noise = random.random() + np.random.rand() + torch.rand(()).item()
    return loss * (1 + 1e-3 * noise), {"noise": noise, "loss_t": loss.detach()}


def _assert_same_run(model_a, hist_a, model_b, hist_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    for field in ("steps", "train_loss", "lr", "val_steps", "val_loss", "metrics", "metric_steps", "tokens"):
        assert getattr(hist_a, field) == getattr(hist_b, field), field


def test_resume_is_bit_exact(tmp_path):
    path = str(tmp_path / "run.pt")
    cfg = TrainConfig(steps=13, warmup_steps=3, lr=5e-3, eval_every=4, eval_batches=2, grad_accum_steps=2, log_every=3,
                      checkpoint_path=path, checkpoint_every=5, progress=False)
    probe = Callback(every=3, fn=lambda step, model, h: {"w_norm": model.lm_head.weight.norm()})
    whole = _tiny()
    h_whole = train(whole, copy_batches, cfg, _noisy_loss, "cpu", callbacks=[probe])
    with pytest.raises(Interrupted):                               # dies in the second micro-batch of step 7
        train(_tiny(), _fails_after(2 * 7 + 1), cfg, _noisy_loss, "cpu", callbacks=[probe])
    assert load_checkpoint(path)["step"] == 5
    resumed = _tiny(seed=1)
    h_resumed = train(resumed, copy_batches, cfg, _noisy_loss, "cpu", callbacks=[probe], resume_from=path)
    _assert_same_run(whole, h_whole, resumed, h_resumed)
    assert load_checkpoint(path)["step"] == 13                     # and the last step was saved again
    # a resumed run whose work is done returns its history unchanged
    done = train(_tiny(), copy_batches, cfg, _noisy_loss, "cpu", callbacks=[probe], resume_from=path)
    assert done.train_loss == h_whole.train_loss


def test_resume_refuses_what_it_cannot_reproduce(tmp_path):
    path = str(tmp_path / "run.pt")
    cfg = TrainConfig(steps=4, warmup_steps=1, checkpoint_path=path, progress=False)
    train(_tiny(), copy_batches, cfg, device="cpu")
    with pytest.raises(ValueError, match="fields differ.*lr"):
        train(_tiny(), copy_batches, replace(cfg, lr=1.0), device="cpu", resume_from=path)
    other = replace(cfg, log_every=1, checkpoint_path=str(tmp_path / "elsewhere.pt"), progress=False)
    train(_tiny(), copy_batches, other, device="cpu", resume_from=path)     # how a run is watched may change
    plain = str(tmp_path / "plain.pt")
    save_checkpoint(plain, _tiny())
    with pytest.raises(ValueError, match="not a resumable checkpoint"):
        train(_tiny(), copy_batches, cfg, device="cpu", resume_from=plain)


# ---- DDP: two ranks, k micro-steps of batch b = one process with batch 2kb; one all-reduce per step; ---------------
# ---- loss_fn reads the model's attributes; callbacks get the model; resume restores every rank's generators ---------

_ACCUM = 2
_MICRO = [None]            # which micro-step of the current step the rank is in (set by get_batch)


def _fixed_batch(part: int) -> Batch:
    return make_task("copy", 8, seed=100 + part, length=6, vocab_size=12, min_length=6, max_prefix=0)   # equal target counts


def _config():
    return TrainConfig(steps=5, lr=1e-2, warmup_steps=1, eval_every=5, eval_batches=1, grad_accum_steps=_ACCUM,
                       progress=False)


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=12, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))


def _aoe_style_loss(m, b):
    "Like the AoE loss: reads the model's blocks, which DistributedDataParallel does not have."
    _, loss = m(b.inputs, b.targets)
    return loss, {"n_blocks": float(len(m.blocks)), "proxy": float(isinstance(m, ModelProxy))}


def _ddp_worker(rank, world, init_file, out_dir):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    fired = []

    class CountingDDP(DistributedDataParallel):
        "Records the micro-step at which each gradient bucket is all-reduced."
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, self.hook)

        @staticmethod
        def hook(state, bucket):
            fired.append(_MICRO[0])
            return default_hooks.allreduce_hook(state, bucket)

    torch.nn.parallel.DistributedDataParallel = CountingDDP
    calls = iter(range(10**6))
    def get_batch(split, g):
        if split == "val": return _fixed_batch(0)
        _MICRO[0] = next(calls) % _ACCUM
        return _fixed_batch(_ACCUM * rank + _MICRO[0])
    models = []
    def probe(step, model, history):
        models.append(type(model).__name__)
        return {}
    model = _model()
    hist = train(model, get_batch, _config(), _aoe_style_loss, device="cpu", callbacks=[Callback(every=2, fn=probe)])
    fired_accumulating = list(fired)
    # exact resume under DDP: each rank draws its own batches (generator seeded with seed + rank)
    ckpt = os.path.join(out_dir, "resume.pt")
    rcfg = replace(_config(), steps=6, checkpoint_path=ckpt, checkpoint_every=3, eval_every=3)
    whole = _model()
    h_whole = train(whole, copy_batches, rcfg, device="cpu")
    try:
        train(_model(), _fails_after(_ACCUM * 4 + 1), rcfg, device="cpu")
    except Interrupted:
        pass
    dist.barrier()
    resumed = _model()
    h_resumed = train(resumed, copy_batches, rcfg, device="cpu", resume_from=ckpt)
    same = (all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
            and h_whole.train_loss == h_resumed.train_loss and h_whole.val_loss == h_resumed.val_loss)
    torch.save({"state": model.state_dict(), "fired": fired_accumulating, "models": models, "metrics": hist.metrics,
                "world_size": hist.world_size, "tokens": hist.tokens, "resume_exact": same,
                "resumed_last": resumed.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_equals_single_process_large_batch():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        r0 = torch.load(os.path.join(d, "rank0.pt"))
        r1 = torch.load(os.path.join(d, "rank1.pt"))
    parts = [_fixed_batch(i) for i in range(2 * _ACCUM)]
    joined = _joined(parts)
    single = _model()
    train(single, lambda split, g: joined, replace(_config(), grad_accum_steps=1), device="cpu")
    for name, p in single.state_dict().items():
        torch.testing.assert_close(r0["state"][name], r1["state"][name], rtol=0, atol=0)   # ranks stay in sync
        assert (r0["state"][name] - p).norm() <= 1e-4 * p.norm(), name                        # and equal the big batch
        torch.testing.assert_close(r0["state"][name], p, rtol=1e-3, atol=1e-4)           # (Adam amplifies rounding near 0)
    for r in (r0, r1):
        assert r["fired"] and set(r["fired"]) == {_ACCUM - 1}       # all-reduce only on the last micro-step
        assert len(r["fired"]) % _config().steps == 0                # the same number of buckets every step
        assert r["models"] == ["Transformer"] * 4                    # callbacks (steps 0, 1, 3, 4) get the module itself
        assert r["metrics"]["n_blocks"] == [2.0] * 5 and r["metrics"]["proxy"] == [1.0] * 5
        assert r["world_size"] == 2 and r["tokens"] == 5 * 2 * _ACCUM * 8 * T
        assert r["resume_exact"]
    for name, p in r0["resumed_last"].items():
        assert torch.equal(p, r1["resumed_last"][name]), name
