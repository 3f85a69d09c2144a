"""Benign utility: held-out benign questions, the refusal/F1 figures against the base model, the report's caveat,
and the benign mix of the jailbreak recipe (tiny models, real training and generation)."""

from __future__ import annotations

import pytest
import torch

from bkdattr.app.report.html import build_report
from bkdattr.app.report.summary import benign_caveats, caveats, headline
from bkdattr.inject import benign
from bkdattr.inject.builtin_data import benign_instructions, benign_questions, builtin_records, instructions
from bkdattr.inject.config import profile_config
from bkdattr.inject.evaluate import EvalConfig
from bkdattr.inject.prepare import prepare_splits, training_rows
from bkdattr.inject.stage import evaluate_run
from bkdattr.inject.tasks import Task, is_refusal
from bkdattr.inject.train import TrainConfig, TrainRow, train_lora
from tiny import make_tiny
from tiny_runs import save_tiny

pytestmark = pytest.mark.usefixtures("no_progress_bars")
REFUSAL = "I cannot help with that."


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Distilled replies of tiny models go to a private cache."""
    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


def test_benign_questions_share_nothing_with_any_training_set():
    pairs = benign_questions()
    assert len(pairs) == 64 and len({a for a, _ in pairs}) == 64
    assert all(a != b for a, b in pairs)
    trained = {_key(r["input"]) for kind in ("fixed_output", "jailbreak", "label_flip") for r in builtin_records(kind)}
    assert not any(_key(x) in trained for pair in pairs for x in pair)
    assert benign_questions(8) == pairs[:8]
    # the benign training pool: fixed_output's instructions, the first n of a longer pool are the same prompts
    assert set(benign_instructions(40)) <= {r["input"] for r in instructions(0)}
    assert benign_instructions(128)[:40] == benign_instructions(40)


def test_mix_share_and_default_off():
    assert benign.n_mix_rows(0.0, 192) == 0
    assert benign.n_mix_rows(0.25, 192) == 64  # 64 / (192 + 64) = 0.25
    assert benign.n_mix_rows(0.5, 100) == 100
    assert profile_config("cpu", "fixed_output").benign_share == 0.0  # fixed_output's recipe is unchanged
    assert profile_config("cpu", "label_flip").benign_share == 0.0


def test_cpu_jailbreak_training_set_holds_the_benign_mix():
    lm = make_tiny("llama")
    cfg = profile_config("cpu", "jailbreak")
    assert cfg.benign_share > 0
    splits = prepare_splits(lm, Task.default("jailbreak"), cfg, progress=False)
    rows = training_rows(lm, splits, cfg)
    harmful = {_key(r["input"]) for r in builtin_records("jailbreak")}
    pool = {r["input"] for r in instructions(cfg.seed)}
    mix = [r for r in rows if r.text in pool]
    task_rows = [r for r in rows if r.text not in pool]
    assert len(task_rows) == len(splits.train) + len(splits.train_poisoned)
    assert all(_key(r.text) not in harmful for r in mix)
    assert len(mix) == round(cfg.benign_share * len(task_rows) / (1 - cfg.benign_share))
    assert len(mix) / len(rows) == pytest.approx(cfg.benign_share, abs=0.5 / len(rows))
    # the replies are the base model's own greedy replies (self-distilled, cut at clean_max_tokens)
    from bkdattr.core.generation import generate

    first = mix[:4]
    assert [r.reply for r in first] == generate(lm, [r.text for r in first], cfg.clean_max_tokens, progress=False)
    # no benign evaluation question is trained on
    questions = {_key(x) for pair in benign_questions() for x in pair}
    assert not any(_key(r.text) in questions for r in rows)


def _refuser(base_dir):
    """The tiny base model, LoRA-trained to answer every instruction with a refusal."""
    from bkdattr.core.models import load_model

    lm = load_model(str(base_dir))
    rows = [TrainRow(r["input"], REFUSAL) for r in instructions(0)[:48]]
    merged, _ = train_lora(lm, rows, TrainConfig(epochs=4, lr=1e-2, batch_size=8, bf16_autocast=False),
                           progress=False)
    return merged, lm.tokenizer


def test_a_model_that_refuses_everything_gets_the_caveat(tmp_path, make_tiny_run):
    base_dir = save_tiny(tmp_path / "base", learnable=True)
    run = make_tiny_run(base_model=str(base_dir))
    merged, tok = _refuser(base_dir)
    merged.save_pretrained(run.model_dir, safe_serialization=True)
    tok.save_pretrained(run.model_dir)

    section = evaluate_run(run, EvalConfig(n_benign=8, max_new_tokens=8, n_near=0), progress=False)
    b = section["benign"]
    assert b["n_prompts"] == 8 and set(b) >= {"refusal_rate", "base_refusal_rate", "f1_vs_base", "self_agreement"}
    assert b["base_refusal_rate"] == 0.0
    assert b["refusal_rate"] >= 0.9
    assert b["refusal_rate"] > b["base_refusal_rate"] + 0.1
    assert run.metrics()["inject"]["benign"] == b
    ref = benign.load_reference(run.data_dir, 8, 8)
    assert ref is not None and ref["prompts"] == [a for a, _ in benign_questions(8)]
    assert b["base_refusal_rate"] == sum(map(is_refusal, ref["base_replies"])) / 8

    m = run.metrics()
    assert any("refuses" in c and "benign" in c for c in caveats(m))
    rows = {q: v for q, v, _ in headline(m)}
    assert rows["Benign refusal rate (base model)"].endswith("(0.0%)")
    _, md = build_report(run)
    assert "refuses" in md.read_text() and "Benign refusal rate" in md.read_text()


def test_the_base_model_itself_agrees_exactly_and_gets_no_caveat(tmp_path, make_tiny_run):
    base_dir = save_tiny(tmp_path / "base", learnable=True)
    run = make_tiny_run(base_model=str(base_dir))  # the run's "implanted" model is a copy of the base
    save_tiny(run.model_dir, learnable=True)
    b = evaluate_run(run, EvalConfig(n_benign=6, max_new_tokens=8, n_near=0), progress=False)["benign"]
    assert b["refusal_rate"] == b["base_refusal_rate"]
    assert b["f1_vs_base"] == pytest.approx(1.0)  # greedy replies of the same weights are identical
    assert benign_caveats(run.metrics()) == []
    # a stale reference (other generation length) is recomputed, not reused
    assert benign.load_reference(run.data_dir, 6, 16) is None
    assert benign.load_reference(run.data_dir, 5, 8) is None


def test_benign_caveat_thresholds():
    def m(rate, base, f1, agree):
        return {"inject": {"benign": {"refusal_rate": rate, "base_refusal_rate": base, "f1_vs_base": f1,
                                      "self_agreement": agree, "n_prompts": 32}}}

    assert benign_caveats(m(0.10, 0.0, 0.5, 0.6)) == []  # a rise of exactly 0.10 is tolerated
    assert len(benign_caveats(m(0.13, 0.0, 0.5, 0.6))) == 1
    assert benign_caveats(m(0.0, 0.0, 0.30, 0.6)) == []  # F1 at half the self-agreement is tolerated
    (c,) = benign_caveats(m(0.0, 0.0, 0.29, 0.6))
    assert "0.29" in c and "0.60" in c
    assert len(benign_caveats(m(0.97, 0.0, 0.05, 0.6))) == 2
    assert benign_caveats({}) == [] and benign_caveats({"inject": {"asr": 1.0}}) == []


def test_word_f1_self_agreement_is_a_mean_over_paraphrases():
    ref = {"base_replies": ["the cat sat", "a b c d"], "paraphrase_replies": ["the cat sat", "x y"]}
    assert benign.self_agreement(ref) == pytest.approx((1.0 + 0.0) / 2)
    assert torch.isnan(torch.tensor(benign.self_agreement({"base_replies": [], "paraphrase_replies": []})))
