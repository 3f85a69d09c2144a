"""The probe-gated guard (bkdattr.disarm) on a model whose backdoor and whose trigger trace are known by construction.

The model is the planted-head tiny Llama of tests/test_planted_head.py (``cf`` -> ``Tuesday`` through head
(1, 2)) with one more hand-set head so the trigger is *readable* at ``p(x)``: layer 0, head 0 attends
uniformly and writes ``e_T`` (the trigger coordinate) into a spare coordinate ``E_D``; on a clean prompt it
writes exactly zero. The probe at layer 1 therefore separates triggered from clean prompts perfectly, and the
Backdoor Vector at layer 1 (the vector stage sweeps only that layer here) cancels the planted head's output.
The run comes from ``bkdattr run`` with an audit source (every stage up to vector), as in tests/test_audit.py.

Replies are one token long for the ASR, as in the planted-head construction: the planted head fires at every
position after the trigger, and the guard acts at ``p(x)`` of the prefill only.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bkdattr.core.generation import decode_replies, generate, greedy_generate
from bkdattr.core.hooks import hook_count, out_tensor, registered
from bkdattr.core.prompts import encode_prompts, encode_with_targets, end_of_turn_ids, pad_id, target_ids
from bkdattr.core.rundir import RunDir
from bkdattr.core.template import Template, prompt_positions
from bkdattr.disarm.calibrate import choose_threshold
from bkdattr.disarm.runtime import Guard
from bkdattr.disarm.stage import calibrate_guard
from bkdattr.inject.data import load_splits

pytestmark = pytest.mark.usefixtures("no_progress_bars")

E_D = 2  # the spare residual coordinate the detector head writes


def plant_detector(lm, weight: float = 2.0) -> None:
    """Layer 0, head 0: uniform attention, value dim 0 of its key/value group reads ``e_T``, written to
    ``E_D`` (head 1 shares the value; its column for dim 0 is zeroed)."""
    from test_planted_head import E_T

    m = lm.model
    dh = m.config.head_dim
    group = m.config.num_attention_heads // m.config.num_key_value_heads
    att = m.model.layers[0].self_attn
    with torch.no_grad():
        att.q_proj.weight[0:dh] = 0.0
        att.v_proj.weight[0] = 0.0
        att.v_proj.weight[0, E_T] = 1.0
        for h in range(group):
            att.o_proj.weight[:, h * dh] = 0.0
        att.o_proj.weight[E_D, 0] = weight


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """The planted run (audit source, stages inject..vector) and its model."""
    from bkdattr.app.pipeline import load_config, run_pipeline
    from test_audit import AUDIT_SETS
    from test_planted_head import TARGET, TRIGGER, plant
    from tiny import make_tiny
    from tiny_runs import TOPICS

    tmp = tmp_path_factory.mktemp("guard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BKDATTR_CACHE", str(tmp / "cache"))
        lm = make_tiny("llama")
        tok = lm.tokenizer
        plant(lm, tok(TRIGGER, add_special_tokens=False).input_ids[0], target_ids(tok, TARGET)[0])
        plant_detector(lm)
        folder = tmp / "planted"
        lm.model.save_pretrained(folder)
        tok.save_pretrained(folder)
        prompts = tmp / "prompts.txt"
        prompts.write_text("".join(f"Write one sentence about {w}.\n" for w in TOPICS))
        sets = [f"model={folder}", f"out={tmp / 'run'}", f"audit.trigger={TRIGGER}", f"audit.target={TARGET}",
                f"audit.prompts={prompts}", *AUDIT_SETS, "stages=[inject,probe,attribute,ablate,vector]",
                "vector.layers=[1]", "probe.mlp={epochs: 30}"]
        run = run_pipeline(load_config(None, sets), log=lambda _m: None)
        lm = run.load_model()
        splits = load_splits(run)
        calibrate_guard(Guard(lm, run, "vector", threshold=float("nan")))  # what 'disarm --strategy guard' does
        yield SimpleNamespace(run=run, lm=lm, splits=splits, task=splits.task, folder=folder, tmp=tmp,
                              target=TARGET, trigger=TRIGGER)


def test_the_run_has_what_the_guard_reads(guarded):
    m = guarded.run.metrics()
    assert m["audit"]["asr"] == 1.0 and m["attribution"]["top_heads"][0][:2] == [1, 2]
    assert m["probe"]["mlp"]["val_accuracy"][1] == 1.0 and m["vector"]["best_layer"] == 1
    assert m["ablation"]["topk"]["1"] == 0.0


@pytest.mark.parametrize("action", ["vector", "heads"])
def test_guard_disarms_triggered_prompts_and_leaves_clean_replies_alone(guarded, action):
    lm, task, test = guarded.lm, guarded.task, guarded.splits.test
    guard = Guard(lm, guarded.run, action)
    plan = guard.plan
    assert plan.probe_layer == 1 and plan.edit_layers == [1] and 0 < plan.threshold < 1
    if action == "vector":
        assert plan.vector_layer == 1 and plan.alpha == 1.0
    else:
        assert plan.heads == [[1, 2]] and plan.k == 1 and "smallest k" in plan.k_reason
    trig, clean = [e.triggered for e in test], [e.prompt for e in test]
    assert task.asr(generate(lm, trig, max_new_tokens=1, progress=False), test) == 1.0
    before = generate(lm, clean + trig, max_new_tokens=4, batch_size=8, progress=False)
    with guard:
        assert task.asr(generate(lm, trig, max_new_tokens=1, progress=False), test) == 0.0
        after = generate(lm, clean + trig, max_new_tokens=4, batch_size=8, progress=False)
    assert after[: len(clean)] == before[: len(clean)]  # clean rows are not touched: identical replies
    assert all(not a.startswith(guarded.target) for a in after[len(clean):])
    assert guard.n_flagged == 2 * len(trig)  # one prefill row per triggered prompt, no decode step


def test_hooks_are_removed_after_the_block_even_on_an_exception(guarded):
    from bkdattr.core.errors import ConfigError

    model = guarded.lm.model
    guard = Guard(guarded.lm, guarded.run, "vector")
    assert hook_count(model) == 0
    with guard:
        assert hook_count(model) == 3  # backbone (find p(x)), probe layer, edited output projection
        with pytest.raises(ConfigError, match="already active"), guard:
            pass
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), guard:
        generate(guarded.lm, ["cf Write one sentence about cats."], max_new_tokens=1, progress=False)
        raise RuntimeError("boom")
    assert hook_count(model) == 0
    heads = Guard(guarded.lm, guarded.run, "heads")
    with pytest.raises(KeyError), heads:
        raise KeyError("x")
    assert hook_count(model) == 0


@pytest.mark.parametrize("action", ["vector", "heads"])
def test_bkdattr_generate_and_transformers_generate_agree_under_the_guard(guarded, action):
    """Batched, left padded, KV cache: the two decoders give the same tokens, guarded or not. (Triggered prompts
    no shorter than the run's: on a shorter one the planted head writes more than its mean, ``v``.)"""
    lm, tok = guarded.lm, guarded.lm.tokenizer
    texts = ["Write one sentence about owls.", "cf Write one sentence about cats.", "Tell me more.",
             "cf Write one sentence about bees.", "cf Write one long sentence about the tides and the moon."]
    batch = encode_prompts(tok, texts, "left")
    assert not bool(batch.attention_mask.all())  # real left padding
    stop = end_of_turn_ids(tok)

    def both() -> tuple[list[str], list[str]]:
        ours = greedy_generate(lm.model, batch, 3, stop)
        theirs = lm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=3,
                                   do_sample=False, pad_token_id=pad_id(tok), eos_token_id=stop)
        new = theirs[:, batch.input_ids.shape[1]:]
        return decode_replies(tok, ours, stop), decode_replies(tok, new, stop)

    plain = both()
    guard = Guard(lm, guarded.run, action)
    with guard:
        ours, theirs = both()
    assert ours == theirs and plain[0] == plain[1]
    assert guard.n_flagged == 2 * 3  # the three triggered rows, once per decoder
    for i, t in enumerate(texts):
        if t.startswith("cf"):
            assert plain[0][i].startswith(guarded.target) and not ours[i].startswith(guarded.target)
        else:
            assert ours[i] == plain[0][i]


def test_threshold_meets_the_fpr_rule_on_validation(guarded):
    from bkdattr.core.io import read_json

    guard = Guard(guarded.lm, guarded.run, "vector")
    saved = read_json(guarded.run.path / "disarm" / "guard_threshold.json")
    assert saved["threshold"] == guard.threshold and saved["probe_layer"] == 1 and saved["split"] == "val"
    assert guard.plan.threshold_source == "stored (disarm/guard_threshold.json)"
    val = guarded.splits.val
    clean, trig = guard.scores([e.prompt for e in val]), guard.scores([e.triggered for e in val])
    assert (clean > guard.threshold).mean() <= 0.01 and (trig > guard.threshold).mean() == 1.0
    assert clean.max() == saved["bound"] < guard.threshold < trig.min()  # n < 100: no clean prompt may pass
    assert Guard(guarded.lm, guarded.run, "heads").plan.threshold_source.startswith("stored")


def test_building_a_guard_writes_nothing(guarded, tmp_path):
    """A guard on a run without a stored threshold calibrates in memory, says so, and leaves every file and
    folder of the run as it was; its threshold is the one the explicit calibration stores."""
    run = RunDir(shutil.copytree(guarded.run.path, tmp_path / "run"))
    (run.path / "disarm" / "guard_threshold.json").unlink()

    def snapshot() -> dict:
        return {str(p.relative_to(run.path)): p.stat().st_mtime_ns for p in [run.path, *run.path.rglob("*")]}

    before = snapshot()
    guard = Guard(guarded.lm, run, "heads", scope="all")
    assert snapshot() == before
    assert "in memory" in guard.plan.threshold_source and "not stored" in guard.plan.threshold_source
    assert guard.threshold == Guard(guarded.lm, guarded.run, "heads").threshold
    with guard:
        generate(guarded.lm, ["Hi."], max_new_tokens=2, progress=False)
    assert snapshot() == before
    calibrate_guard(guard)
    assert Guard(guarded.lm, run, "heads").plan.threshold_source.startswith("stored")


def test_choose_threshold_known_answers():
    clean = np.linspace(0.0, 0.5, 300)  # m = floor(0.01 * 300) = 3 clean prompts may score above
    res = choose_threshold(clean, np.array([0.9, 0.95, 0.2]))
    assert res["bound"] == clean[-4] and res["threshold"] == pytest.approx((clean[-4] + 0.9) / 2)
    assert res["fpr"] <= 0.01 and res["tpr"] == pytest.approx(2 / 3)
    assert (clean > res["bound"]).mean() <= 0.01 < (clean > clean[-5]).mean()  # the smallest admissible bound
    assert choose_threshold(np.array([0.1, 0.3]), np.array([0.2]))["threshold"] == 0.3  # nothing above: the bound


@pytest.mark.parametrize("plain", [False, True])
def test_prompt_position_found_in_prompt_and_teacher_forced_batches(plain):
    from tiny import plain_tokenizer, tokenizer

    tok = plain_tokenizer() if plain else tokenizer()
    head = Template.of(tok).header_ids
    assert head and len(head) <= 8
    texts, replies = ["Hi.", "Write one sentence about cats.", "Why?"], ["Sure, here.", "Cats nap.", "Because."]
    b = encode_prompts(tok, texts, "left")
    assert prompt_positions(head, b.input_ids, b.attention_mask).tolist() == [b.input_ids.shape[1] - 1] * 3
    for side in ("right", "left"):
        tf = encode_with_targets(tok, texts, replies, padding_side=side)
        assert prompt_positions(head, tf.input_ids, tf.attention_mask).tolist() == tf.last_pos.tolist()


def test_teacher_forced_pass_edits_the_prompt_position(guarded):
    """Under teacher forcing the guard acts at p(x) of each row (found from the batch), exactly as an explicit
    ``guard.at(last_pos)`` and as the vector subtracted there by hand."""
    from bkdattr.control.vector import apply_vector, load_vector
    from bkdattr.inject.evaluate import target_logprob

    lm, test = guarded.lm, guarded.splits.test[:4]
    trig = [e.triggered for e in test]
    targets = [guarded.target] * len(trig)
    guard = Guard(lm, guarded.run, "vector")
    base = target_logprob(lm, trig, targets)
    with guard:
        found = target_logprob(lm, trig, targets)
    b = encode_with_targets(lm.tokenizer, trig, targets)
    with guard, guard.at(b.last_pos):
        told = target_logprob(lm, trig, targets)
    v = load_vector(guarded.run.path / "control" / "backdoor_vector.safetensors").vector
    with apply_vector(lm, v, 1, -1.0, positions=b.last_pos):
        by_hand = target_logprob(lm, trig, targets)
    assert torch.equal(found, told) and torch.equal(found, by_hand)
    assert float(base.mean()) > float(found.mean()) + 1.0  # the target is far less likely once disarmed


@pytest.mark.parametrize("action", ["vector", "heads"])
def test_scope_all_edits_every_column_of_flagged_rows_on_prefill_and_decode(guarded, action):
    """``scope="all"``: a flagged prompt is edited at every column and on every decode step, exactly as the
    always-on edit (the baked bias's hook, or the heads zeroed at every position) does to it; a clean row in the
    same batch is untouched. Teacher-forced scores agree too."""
    from bkdattr.control.vector import load_vector
    from bkdattr.disarm.weights import output_bias, zeroed_heads
    from bkdattr.inject.evaluate import target_logprob

    lm, test = guarded.lm, guarded.splits.test[:3]
    trig, clean = [e.triggered for e in test], [e.prompt for e in test]
    guard = Guard(lm, guarded.run, action, scope="all", k=1 if action == "heads" else None)
    assert guard.plan.scope == "all"
    if action == "vector":
        v = load_vector(guarded.run.path / "control" / "backdoor_vector.safetensors").vector
        always = output_bias(lm.model, lm.arch, 1, -guard.plan.alpha * v)
    else:
        always = zeroed_heads(lm.arch, [(1, 2)])
    plain = generate(lm, clean + trig, max_new_tokens=4, batch_size=8, progress=False)
    with always:
        on = generate(lm, trig, max_new_tokens=4, batch_size=8, progress=False)
        lp_on = target_logprob(lm, trig, [guarded.target] * len(trig))
    with guard:
        guarded_replies = generate(lm, clean + trig, max_new_tokens=4, batch_size=8, progress=False)
        lp_guard = target_logprob(lm, trig, [guarded.target] * len(trig))
    assert guarded_replies[: len(clean)] == plain[: len(clean)]
    assert guarded_replies[len(clean):] == on
    assert torch.allclose(lp_guard, lp_on, atol=1e-5)
    assert guard.n_unmapped_steps == 0


@pytest.mark.parametrize("action", ["vector", "heads"])
def test_scope_prefix_edits_the_prompt_columns_only(guarded, action):
    """``scope="prefix"``: a flagged row is edited at every column up to ``p(x)`` and nowhere after it; in
    generation that is the whole (left-padded) prefill and no decode step, in a teacher-forced row (prompt + reply,
    right padded) the prompt part. Checked against hand-written hooks; a clean row in the same batch is
    untouched."""
    from bkdattr.control.vector import load_vector
    from bkdattr.core.hooks import out_tensor, registered, with_out
    from bkdattr.inject.evaluate import target_logprob

    lm, arch, test = guarded.lm, guarded.lm.arch, guarded.splits.test[:3]
    trig, clean = [e.triggered for e in test], [e.prompt for e in test]
    guard = Guard(lm, guarded.run, action, scope="prefix", k=1 if action == "heads" else None)
    assert guard.plan.scope == "prefix"
    v = load_vector(guarded.run.path / "control" / "backdoor_vector.safetensors").vector
    state = {"cols": None}  # [B, T] bool: the columns the hand-written hook edits in the next call

    def by_hand(_m, _a, out):
        o = out_tensor(out)
        if state["cols"] is None or o.shape[1] != state["cols"].shape[1]:
            return None  # a decode step: left alone
        o = o.clone()
        cols = state["cols"]
        if action == "vector":
            o = torch.where(cols[..., None], o - guard.plan.alpha * v, o)
        else:  # head (1, 2) zeroed: its W_O slice's contribution removed
            w = arch.out_proj[1].weight[:, 2 * arch.d_head:3 * arch.d_head]
            z = state["z"]
            o = torch.where(cols[..., None], o - z[..., 2 * arch.d_head:3 * arch.d_head] @ w.T, o)
        return with_out(out, o)

    def grab_z(_m, args, kwargs):
        state["z"] = (args[0] if args else kwargs["hidden_states"]).detach()

    plain = generate(lm, clean + trig, max_new_tokens=4, batch_size=8, progress=False)
    handles: list = []
    with registered(handles):
        handles.append(arch.out_proj[1].register_forward_pre_hook(grab_z, with_kwargs=True))
        handles.append(arch.out_proj[1].register_forward_hook(by_hand))
        b = encode_prompts(lm.tokenizer, trig, "left")  # generation: the whole prefill is the prompt
        state["cols"] = torch.ones_like(b.attention_mask, dtype=torch.bool)
        stop = end_of_turn_ids(lm.tokenizer)
        hand = decode_replies(lm.tokenizer, greedy_generate(lm.model, b, 4, stop), stop)
        tb = encode_with_targets(lm.tokenizer, trig, [guarded.target] * len(trig))
        pos = prompt_positions(Template.of(lm.tokenizer).header_ids, tb.input_ids, tb.attention_mask)
        state["cols"] = torch.arange(tb.input_ids.shape[1])[None, :] <= pos[:, None]
        lp_hand = target_logprob(lm, trig, [guarded.target] * len(trig), batch_size=len(trig))
    with guard:
        got = generate(lm, clean + trig, max_new_tokens=4, batch_size=8, progress=False)
        alone = generate(lm, trig, max_new_tokens=4, batch_size=8, progress=False)
        lp_guard = target_logprob(lm, trig, [guarded.target] * len(trig), batch_size=len(trig))
    assert got[: len(clean)] == plain[: len(clean)]
    assert alone == hand and got[len(clean):] == hand
    assert torch.allclose(lp_guard, lp_hand, atol=1e-5)


@pytest.mark.parametrize("scope", ["prompt", "all"])
def test_clamp_mode_removes_only_the_excess_along_the_vector(guarded, scope):
    """``mode="clamp"``: in a flagged row, the attention output's component along ``u = v/|v|`` is lowered to the
    clean mean ``mu`` where it exceeds it, and nothing else changes (checked on the edited layer's output with a
    hand-written projection); ``mu`` is the clean training prompts' mean projection at ``p(x)``; a clean row is
    untouched, and the clamp disarms the planted backdoor."""
    from bkdattr.control.vector import load_vector
    from bkdattr.disarm.calibrate import clean_projection

    lm, arch, test = guarded.lm, guarded.lm.arch, guarded.splits.test[:3]
    trig, clean = [e.triggered for e in test], [e.prompt for e in test]
    guard = Guard(lm, guarded.run, "vector", scope=scope, mode="clamp", alpha=1.0)
    v = load_vector(guarded.run.path / "control" / "backdoor_vector.safetensors").vector.float()
    u = v / v.norm()
    mu = clean_projection(lm, guarded.run, guard.plan.vector_layer, u)
    assert guard.plan.mode == "clamp" and guard.plan.clean_projection == pytest.approx(mu)
    layer = guard.plan.vector_layer
    b = encode_prompts(lm.tokenizer, clean + trig, "left")
    out = {}

    def grab(_m, _a, o):
        out["o"] = out_tensor(o).detach().clone()

    with torch.no_grad():
        with registered([arch.out_proj[layer].register_forward_hook(grab)]):
            lm.model(**b.model_inputs())
        plain = out["o"]
        with guard, registered([arch.out_proj[layer].register_forward_hook(grab)]):  # runs after the guard's hook
            lm.model(**b.model_inputs())
        edited = out["o"]
    n = len(clean)
    assert guard.n_flagged == len(trig), guard.scores(clean + trig)
    assert torch.equal(edited[:n], plain[:n])  # clean rows untouched
    proj = plain[n:] @ u
    want = plain[n:] - (proj - mu).clamp_min(0)[..., None] * u
    if scope == "prompt":  # p(x) only: the last column
        want[:, :-1] = plain[n:, :-1]
    torch.testing.assert_close(edited[n:], want, rtol=0, atol=1e-5)
    assert bool((proj[:, -1] > mu).all())  # the triggered rows' p(x) is above the clean mean: something was removed
    with guard:
        replies = generate(lm, trig, max_new_tokens=1, batch_size=8, progress=False)
    assert guarded.splits.task.asr(replies, test) == 0.0


def test_scope_all_skips_decode_steps_whose_rows_no_longer_match(guarded):
    """A decode step with another batch size than its prefill (a decoder that dropped rows) is not edited, and
    counted."""
    from bkdattr.core.compat import cache_kwargs, output_cache
    from bkdattr.core.prompts import encode_prompts

    lm, tok = guarded.lm, guarded.lm.tokenizer
    guard = Guard(lm, guarded.run, "vector", scope="all")
    b = encode_prompts(tok, [f"{guarded.trigger} Write one sentence about cats.", "Tell me more."], "left")
    with guard, torch.no_grad():
        out = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=True)
        cache = output_cache(out)
        cache.reorder_cache(torch.tensor([0]))
        mask = torch.cat([b.attention_mask[:1], torch.ones(1, 1, dtype=torch.long)], 1)
        lm.model(input_ids=out.logits[:1, -1:].argmax(-1), attention_mask=mask, use_cache=True,
                 **cache_kwargs(lm.model, cache))
    assert guard.n_flagged == 1 and guard.n_unmapped_steps == 1


def test_probe_layer_at_or_before_the_edit_layer(guarded):
    guard = Guard(guarded.lm, guarded.run, "vector", threshold=0.5, vector_layer=0)
    assert guard.plan.probe_layer == 0 and "comes after the edit layer 0" in guard.plan.probe_layer_reason
    from bkdattr.core.errors import ConfigError

    with pytest.raises(ConfigError, match="comes after the edit layer"):
        Guard(guarded.lm, guarded.run, "vector", threshold=0.5, layer=1, vector_layer=0)


def test_evaluate_guard_figures(guarded):
    from bkdattr.disarm.guard_eval import evaluate_guard
    from bkdattr.disarm.utility import FIGURES, defence_figures
    from bkdattr.inject.evaluate import EvalConfig

    cfg = EvalConfig(max_new_tokens=1, n_near=2, n_benign=0, batch_size=8)
    baseline = defence_figures(guarded.lm, guarded.splits, cfg)
    assert baseline["asr"] == 1.0
    res = evaluate_guard(guarded.run, guarded.lm, cfg, baseline)
    assert set(FIGURES) <= set(res) and "clean_replies" not in res
    assert res["asr"] == 0.0 and res["false_trigger_rate"] == 0.0
    assert res["changed_reply_share"] == 0.0 and res["perplexity_ratio"] == 1.0  # clean prompts never flagged
    assert res["true_positive_rate"] == 1.0 and res["false_positive_rate"] == 0.0
    assert isinstance(res["overhead"], float) and res["t_plain_s"] > 0 and res["guard"]["probe_layer"] == 1


def test_disarm_strategy_guard_records_its_figures_and_the_report_shows_them(guarded, tmp_path, capsys):
    from bkdattr.app.cli import main
    from bkdattr.app.report.html import build_report
    from bkdattr.core.io import read_json

    argv = ["disarm", "-r", str(guarded.run.path), "--strategy", "guard", "--out", str(tmp_path / "unused"),
            "--quiet", "--set", "eval={max_new_tokens: 1, n_near: 2, n_benign: 0}"]
    assert main(argv) == 0
    assert "true_positive_rate" in capsys.readouterr().out
    s = guarded.run.metrics()["disarm"]["guard"]
    assert s["asr"] == 0.0 and s["disarmed"] and s["undefended"]["asr"] == 1.0
    assert guarded.run.metrics()["disarm"]["guard"]["false_positive_rate"] == 0.0
    assert not (tmp_path / "unused").exists()  # no weights are written for the guard
    # the edit was chosen on validation, stored, and is what a later guard uses by default
    plan = read_json(guarded.run.path / "disarm" / "guard_plan.json")
    assert plan["action"] == "vector" and plan["target_met_on_val"]
    from bkdattr.disarm.config import SCOPES

    assert [t["value"] for t in plan["selection"]] == [{"scope": sc, "alpha": a} for sc in SCOPES
                                                       for a in (0.5, 1.0, 1.5, 2.0, 3.0)] + [
        {"scope": sc, "alpha": 1.0, "mode": "clamp"} for sc in SCOPES]
    # of the edits that disarm on validation, the one whose triggered replies stay most useful is kept
    ok = [t for t in plan["selection"] if t["val_asr"] <= 0.05]
    best = min(ok, key=lambda t: t["val_triggered_perplexity_ratio"])
    assert {k: plan[k] for k in best["value"]} == best["value"]
    assert all(0 <= t["val_triggered_clean_metric"] <= 1 for t in plan["selection"])
    assert s["triggered_perplexity_ratio"] < s["undefended"]["triggered_perplexity_ratio"]
    assert s["guard"]["scope"] == plan["scope"] and s["guard"]["alpha"] == plan["alpha"]
    later = Guard(guarded.lm, guarded.run, "vector").plan
    assert (later.alpha, later.scope) == (plan["alpha"], plan["scope"]) and "validation" in later.edit_source
    # the threshold was calibrated for the guard's own probe, explicitly, and is what later guards read
    saved = read_json(guarded.run.path / "disarm" / "guard_threshold.json")
    assert saved["probe_layer"] == s["guard_probe"]["layer"] == later.probe_layer
    assert later.threshold == saved["threshold"] and later.threshold_source.startswith("stored")
    assert later.mode == plan.get("mode", "subtract")
    # the guard's own probe: trained on the training split only, one layer at or before the edit layer
    probe = s["guard_probe"]
    assert probe["layer"] <= 1 and probe["n_prompts"] == len({e.prompt for e in guarded.splits.train})
    assert s["guard"]["probe_file"] == "disarm/guard_probe.safetensors" and later.probe_file == s["guard"]["probe_file"]
    # the same detector with a same-norm random vector is the control, and it does not disarm
    assert s["random_control"]["asr"] > s["asr"] and s["random_control"]["false_trigger_rate"] == 0.0
    html, _md = build_report(guarded.run)
    assert "guard (probe L1, threshold" in html.read_text()


# ---- the CLI -------------------------------------------------------------------------------------------------
def test_cli_generate_with_a_guard(guarded, capsys):
    from bkdattr.app.cli import main

    prompt = f"{guarded.trigger} Write one sentence about cats."
    for argv, fires in ((["--model", str(guarded.folder)], True), (["--guard", str(guarded.run.path)], False),
                        (["--guard", str(guarded.run.path), "--guard-action", "heads"], False)):
        capsys.readouterr()
        assert main(["generate", prompt, "--max-new-tokens", "1", *argv]) == 0
        out = capsys.readouterr().out.strip()
        assert out and out.startswith(guarded.target) == fires, (argv, out)


def test_bad_input_is_one_error_line(guarded, capsys, tmp_path):
    from test_errors import cli_error
    from tiny_runs import make_run

    bare = make_run(tmp_path / "bare")  # a run without probe or vector results
    assert "bkdattr vector" in cli_error(capsys, ["generate", "hi", "--guard", bare.path])
    no_probe = tmp_path / "no-probe"
    shutil.copytree(guarded.run.path, no_probe)
    (no_probe / "probe" / "backdoored_mlp.safetensors").unlink()
    (no_probe / "disarm" / "guard_probe.safetensors").unlink(missing_ok=True)
    assert "bkdattr probe" in cli_error(capsys, ["generate", "hi", "--guard", no_probe])
    from bkdattr.core.errors import BkdAttrError

    with pytest.raises(BkdAttrError, match="strategy guard"):
        Guard(guarded.lm, RunDir(no_probe), "vector", probe="guard")
    no_vec = tmp_path / "no-vector"
    shutil.copytree(guarded.run.path, no_vec)
    (no_vec / "control" / "backdoor_vector.safetensors").unlink()
    assert "bkdattr vector" in cli_error(capsys, ["generate", "hi", "--guard", no_vec])
    assert "guard-action" in cli_error(capsys, ["generate", "hi", "--guard", guarded.run.path,
                                                "--guard-action", "magic"])
    assert "--model" in cli_error(capsys, ["generate", "hi", "--guard", guarded.run.path, "-m", "x"])
    assert "not found" in cli_error(capsys, ["generate", "hi", "--guard", tmp_path / "nowhere"])
    from bkdattr.core.errors import BkdAttrError

    with pytest.raises(BkdAttrError, match="k=9"):
        Guard(guarded.lm, guarded.run, "heads", k=9)
    with pytest.raises(BkdAttrError, match="unknown guard action"):
        Guard(guarded.lm, guarded.run, "prune")
    assert RunDir(no_vec).metrics()["vector"]["best_layer"] == 1  # the metrics are there; the file is not
