"""Baseline: epoch cap, cache key of every setting that decides the weights, the cache checks settings before
loading weights, and the results payload reports what the run did (--steps, epochs, throughput).

The profile's sizes are replaced by tiny ones (a 100 kB corpus, a one-layer model): the same code paths as the
full profile — tokenizer, packed corpus stream, epoch cap, cache, payload — in a few seconds on the CPU."""
import json
from dataclasses import replace

import lmcourse  # noqa: F401
import pytest
import torch

import lmcourse.baseline as baseline
from lmcourse.baseline import baseline_configs, baseline_key, baseline_result, fit_to_epochs, load_or_train_baseline
from lmcourse.model import ModelConfig
from lmcourse.train import TrainConfig


def _tiny_configs(profile=None, steps=None):
    "The profile's settings (its corpus included) at tiny sizes; no torch.compile (tested in test_train)."
    configs = baseline_configs(profile, steps)
    configs["tokenizer"] = {**configs["tokenizer"], "vocab_size": 300, "train_bytes": 100_000}
    configs["data"] = {**configs["data"], "train_bytes": 100_000, "val_bytes": 20_000}
    configs["model"] = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    configs["train"] = replace(configs["train"], steps=steps or 4, warmup_steps=1, batch_size=2, seq_len=32,
                               eval_every=2, eval_batches=1, compile=False, log_every=2, timing_warmup=1, progress=False)
    return configs


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("LMCOURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(baseline, "baseline_configs", _tiny_configs)
    return tmp_path


def test_fit_to_epochs_caps_steps_and_scales_warmup():
    cfg = TrainConfig(steps=3000, warmup_steps=200, batch_size=32, seq_len=1024)
    assert fit_to_epochs(cfg, 10**9, 2.0) is cfg                        # a large corpus: unchanged
    capped = fit_to_epochs(cfg, 8_800_000, 2.0)
    assert capped.steps == 537 and capped.warmup_steps == round(200 * 537 / 3000)
    assert capped.steps * 32 * 1024 <= 2 * 8_800_000 < (capped.steps + 1) * 32 * 1024
    assert fit_to_epochs(cfg, 8_800_000, 2.0, world_size=4).steps == 134          # DDP: 4 ranks train 4x the tokens
    assert fit_to_epochs(replace(cfg, grad_accum_steps=2), 8_800_000, 2.0).steps == 268
    with pytest.raises(ValueError, match="smaller than one step"):
        fit_to_epochs(cfg, 1000, 2.0)


def test_full_profile_settings():
    full = baseline_configs("full")
    assert full["train"].compile and full["max_epochs"] == 2.0 and full["model"].n_kv_heads == 4
    assert full["data"]["name"] == full["tokenizer"]["corpus"] == "stdlib+site"      # the larger corpus, for both
    assert baseline_key(full) != baseline_key(baseline_configs("smoke"))
    assert baseline_configs("full", steps=10)["train"].steps == 10
    assert baseline_configs("full", steps=10)["train"].warmup_steps == 10


def test_cache_key_covers_every_setting_that_decides_the_weights():
    configs = baseline_configs("smoke")
    key = baseline_key(configs)
    changed = [
        {**configs, "tokenizer": {**configs["tokenizer"], "vocab_size": 2048}},
        {**configs, "tokenizer": {**configs["tokenizer"], "train_bytes": 2_000_000}},
        {**configs, "data": {**configs["data"], "train_bytes": 3_000_000}},
        {**configs, "model": replace(configs["model"], d_model=64)},
        {**configs, "train": replace(configs["train"], lr=1e-3)},
        {**configs, "train": replace(configs["train"], steps=151)},
        {**configs, "max_epochs": 1.0},
    ]
    assert len({key, *map(baseline_key, changed)}) == len(changed) + 1
    watched = {**configs, "train": replace(configs["train"], progress=False, log_every=1, timing_warmup=0)}
    assert baseline_key(watched) == key                                 # how a run is watched does not matter


def test_load_or_train_baseline_trains_once_then_loads(tiny, monkeypatch):
    model, tok, history = load_or_train_baseline("smoke", device="cpu", progress=False)
    assert len(history.steps) == 4 and history.epochs == pytest.approx(history.tokens / history.epoch_tokens)
    cached = list(tiny.glob("baseline-smoke-*.pt"))
    assert len(cached) == 1
    monkeypatch.setattr(baseline, "train_baseline", lambda *a, **k: pytest.fail("the cached baseline was retrained"))
    again, _, h_again = load_or_train_baseline("smoke", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.cpu().parameters(), again.parameters()))
    assert h_again.val_loss == history.val_loss


def test_changed_settings_train_a_new_baseline_instead_of_loading_stale_weights(tiny, monkeypatch):
    load_or_train_baseline("smoke", device="cpu", progress=False)
    def wider(profile=None, steps=None):
        configs = _tiny_configs(profile, steps)
        configs["model"] = replace(configs["model"], d_model=48)      # old weights would not even fit
        return configs
    monkeypatch.setattr(baseline, "baseline_configs", wider)
    model, _, _ = load_or_train_baseline("smoke", device="cpu", progress=False)
    assert model.cfg.d_model == 48 and len(list(tiny.glob("baseline-smoke-*.pt"))) == 2


def test_results_payload_reports_what_the_run_did(tiny, capsys, monkeypatch):
    "The full profile's path (stdlib+site corpus, --steps, payload) at tiny sizes."
    monkeypatch.setenv("LMCOURSE_PROFILE", "smoke")                     # main() sets it; restored afterwards
    history = baseline.main(["--profile", "full", "--steps", "3"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1].rsplit("}", 1)[0] + "}")
    assert printed["steps"] == 3 and printed["mfu"] is None
    payload = baseline_result("full", history)
    assert payload["train"]["steps"] == payload["steps"] == 3                # the --steps override, not the profile's 4
    assert payload["data"]["name"] == "stdlib+site" and payload["data"]["packages"] and payload["data"]["python"]
    assert payload["epochs"] == pytest.approx(3 * 2 * 32 / payload["data"]["train_tokens"])
    assert payload["tokens_per_s"] == payload["tokens_per_s_per_device"] > 0 and payload["world_size"] == 1
    json.dumps(payload)                                                  # what save_result writes
