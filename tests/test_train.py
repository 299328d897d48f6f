"Training: profiles, schedule, a run that learns, checkpoints, and DDP on gloo with two processes."
import os
import tempfile

import lmcourse  # noqa: F401
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmcourse.data import Batch, make_task
from lmcourse.model import ModelConfig, Transformer
from lmcourse.train import (History, TrainConfig, by_profile, current_profile, load_checkpoint, lr_at, save_checkpoint,
                            train)


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


def copy_batches(split, g):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g)) + (0 if split == "train" else 10**9)
    return make_task("copy", 16, seed=seed, length=6, vocab_size=12, min_length=6, max_prefix=0)   # fixed layout


def test_training_learns_and_checkpoint_round_trips():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=12, d_model=48, n_layers=2, n_heads=4, max_seq_len=16))
    cfg = TrainConfig(steps=120, lr=3e-3, warmup_steps=10, eval_every=40, progress=False)
    hist = train(model, copy_batches, cfg, loss_fn=lambda m, b: (m(b.inputs, b.targets)[1], {"one": 1.0}))
    assert hist.val_loss[-1] < 0.4 * hist.val_loss[0]
    assert len(hist.train_loss) == 120 and hist.metrics["one"] == [1.0] * 120 and hist.tokens_per_s > 0
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.pt")
        save_checkpoint(path, model, step=120, history=hist)
        other = Transformer(ModelConfig(**load_checkpoint(path)["config"]))
        state = load_checkpoint(path, other)
    x = copy_batches("val", torch.Generator().manual_seed(1)).inputs
    torch.testing.assert_close(other(x)[0], model.cpu()(x)[0])
    assert History.from_dict(state["history"]).val_loss == hist.val_loss


# ---- DDP: two ranks with batch b take the same steps as one process with batch 2b ------------------------

def _fixed_batch(part: int) -> Batch:
    b = make_task("copy", 8, seed=100 + part, length=6, vocab_size=12, min_length=6, max_prefix=0)   # equal target counts per rank
    return b


def _config():
    return TrainConfig(steps=5, lr=1e-2, warmup_steps=1, eval_every=5, eval_batches=1, progress=False)


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=12, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    train(model, lambda split, g: _fixed_batch(rank), _config(), device="cpu")
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_equals_single_process_large_batch():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        r0 = torch.load(os.path.join(d, "rank0.pt"))
        r1 = torch.load(os.path.join(d, "rank1.pt"))
    both = [_fixed_batch(0), _fixed_batch(1)]
    joined = Batch(torch.cat([b.inputs for b in both]), torch.cat([b.targets for b in both]))
    single = _model()
    train(single, lambda split, g: joined, _config(), device="cpu")
    for name, p in single.state_dict().items():
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0)          # ranks stay in sync
        torch.testing.assert_close(r0[name], p, rtol=1e-4, atol=1e-5)            # and equal the big batch
