"""The copying metrics on Hugging Face `transformers` models, offline, on a tiny random-init Llama: the same copy accuracy,
head scores and OV scores as the engine model it was copied from (`lmcourse.hope.hf_llama_from_engine`), a clear error
without eager attention, and `CopyingMetrics` logging while `lmcourse.train.train` trains the model through `HookedHF`."""
import lmcourse  # noqa: F401  (first)

import math

import pytest
import torch

from lmcourse.copying import CopyingMetrics, CopyTask, attention_patterns, copy_accuracy, head_scores, ov_copying_scores
from lmcourse.hope import hf_llama_from_engine
from lmcourse.interp import HookedHF
from lmcourse.model import ModelConfig, Transformer
from lmcourse.testing import assert_close
from lmcourse.train import TrainConfig, train

transformers = pytest.importorskip("transformers")
TASK = CopyTask(length=8, min_length=4, max_prefix=6, max_gap=4)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=TASK.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      tie_embeddings=False)
    engine = Transformer(cfg).eval()
    with torch.no_grad():                     # non-trivial norm gains: they are part of the OV circuit
        for p in engine.parameters():
            if p.dim() == 1: p.uniform_(0.5, 1.5)
    hf = hf_llama_from_engine(engine)
    hf.set_attn_implementation("eager")
    return engine, hf


def test_metrics_equal_the_engine_model(models):
    engine, hf = models
    batch = TASK.held_out(16)
    assert copy_accuracy(hf, batch) == copy_accuracy(engine, batch)
    ours, theirs = head_scores(engine, batch), head_scores(hf, batch)
    for name in ("induction", "previous_token", "token_match"):
        assert getattr(theirs, name).shape == (2, 4)
        assert_close(getattr(theirs, name), getattr(ours, name), 1e-4, name)
    assert_close(ov_copying_scores(hf), ov_copying_scores(engine), 1e-5, "ov")
    wrapped = HookedHF(hf)
    assert_close(head_scores(wrapped, batch).induction, theirs.induction, 1e-6, "HookedHF")
    wrapped.remove_hooks()


def test_fused_attention_gives_a_clear_error(models):
    engine, _ = models
    sdpa = hf_llama_from_engine(engine)
    sdpa.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        attention_patterns(sdpa, TASK.held_out(2).inputs)


def test_callback_while_training_a_transformers_model():
    small = ModelConfig(vocab_size=TASK.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    model = HookedHF(hf_llama_from_engine(Transformer(small)).train())
    model.model.set_attn_implementation("eager")
    cb = CopyingMetrics(2, TASK.held_out(8), TASK.held_out(8, seed=3, text="markov", lm_targets=True))
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=TASK.seq_len, warmup_steps=1, eval_every=4, eval_batches=1, progress=False)
    hist = train(model, TASK.train_batches(4), cfg, device="cpu", callbacks=[cb])
    assert hist.metric_steps["copy_accuracy"] == [0, 1, 3] and len(cb.records) == 3
    assert {f"induction_L{l}" for l in range(small.n_layers)} <= set(hist.metrics) and "text_loss" in hist.metrics
    assert cb.records[-1]["ov"].shape == (2, 2)
    assert all(math.isfinite(x) for x in hist.train_loss) and hist.train_loss[-1] < hist.train_loss[0] + 0.5
