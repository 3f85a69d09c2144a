"""``bkdattr scan`` on tiny trained models with a known answer, its artifacts, CLI errors and the hand-off to
``bkdattr audit --from-scan``."""

from __future__ import annotations

import html
import itertools
import json

import pytest
import torch

from bkdattr.app.cli import main
from bkdattr.app.commands.scan import EXIT_STATUS, print_scan
from bkdattr.core.errors import ArtifactError, ConfigError
from bkdattr.core.generation import generate, greedy_decode, sampler
from bkdattr.core.hooks import count_work
from bkdattr.core.prompts import encode_prompts, end_of_turn_ids
from bkdattr.scan import ScanConfig, read_scan, scan, write_scan
from bkdattr.scan.budget import Budget
from bkdattr.scan.handoff import audit_call, audit_inputs
from bkdattr.scan.insert import insert
from bkdattr.scan.mine import mine_triggers
from tiny import make_tiny
from tiny_backdoor import TARGET, TRIGGER, trained

SMALL = dict(leak_samples=4, first_tokens=8, search_steps=4, search_candidates=16, n_test=8,
             progress=False)


def ticking(step: float):
    """A wall clock that advances ``step`` seconds at every reading: no real time in a test's answer."""
    n = itertools.count()
    return lambda: step * next(n)


def test_scan_finds_the_planted_trigger_first(tmp_path):
    lm = trained(poison=True)
    res = scan(tmp_path / "s", "tiny-backdoor", cfg=ScanConfig(**SMALL), lm=lm)
    assert res["flagged"] and res["score"] >= 0.9 and res["verdict"] == "flagged"
    top = res["candidates"][0]
    assert top["trigger"] == TRIGGER and top["source"] == "search"
    assert TARGET.startswith(top["target"][:12]) and top["asr"] == 1.0 and top["clean_asr"] == 0.0
    assert top["kl"] > 0.1 and top["changed_share"] == 1.0 and top["agreement"] == 1.0
    assert top["counted"] and top["target_q_mean"] >= ScanConfig().target_q_min  # the planted target is primed
    # scan.json round trip: what was returned is what was written (JSON-normalised)
    assert read_scan(tmp_path / "s") == json.loads(json.dumps(res))
    page = (tmp_path / "s" / "report.html").read_text()
    assert "Backdoor suspected" in page
    searched = [t for t in res["targets"] if t.get("searched")]
    assert searched and searched[0]["eligible"] and searched[0]["first_logp"] >= ScanConfig().first_logp_min
    assert top["target_first_logp"] == searched[0]["first_logp"] and "searched" in page
    # the budget is work, not seconds: on a very slow machine (1000 s a wall-clock reading) the scan does the same
    # work and finds the same candidates
    slow = scan(tmp_path / "slow", "tiny-backdoor", cfg=ScanConfig(**SMALL), lm=lm, wall_clock=ticking(1000.0))
    assert slow["work"] == res["work"] and slow["verdict"] == "flagged" and slow["seconds"] >= 1000.0 > res["seconds"]
    assert [(c["trigger"], c["asr"]) for c in slow["candidates"]] == [(c["trigger"], c["asr"])
                                                                     for c in res["candidates"]]


def test_scan_of_the_clean_twin_is_not_flagged_and_lists_candidates(tmp_path, capsys):
    res = scan(tmp_path / "s", "tiny-clean", cfg=ScanConfig(**SMALL), lm=trained(poison=False),
               wall_clock=ticking(1.0))
    assert not res["flagged"] and res["score"] < res["threshold"]
    assert res["verdict"] == "not_found" and res["not_covered"] == [] and 0 < res["work"] < res["budget_work"]
    assert res["candidates"] and all(c["effect"] < 0.5 for c in res["candidates"])
    assert all(c["trigger"] != TRIGGER for c in res["candidates"])
    page = (tmp_path / "s" / "report.html").read_text()
    # the page escapes what it shows (a candidate such as laCrit='itability appears as laCrit=&#x27;itability)
    assert "No backdoor found" in page and html.escape(res["candidates"][0]["trigger"].split()[0]) in page
    assert EXIT_STATUS[res["verdict"]] == 0


def test_a_scan_the_budget_cuts_is_incomplete_never_not_found(tmp_path, capsys):
    """The clean twin with a work budget a twentieth of what its scan needs, and with a wall-clock limit that a
    1 s-a-reading clock passes half way: nothing is flagged, and the verdict is 'incomplete' (scan.json, report,
    console, exit status 4), never 'not_found': a cut search reads like a clean one."""
    clean = trained(poison=False)
    full = scan(tmp_path / "s", "tiny-clean", cfg=ScanConfig(**SMALL), lm=clean, wall_clock=ticking(1.0))
    assert full["verdict"] == "not_found" and not full["wall_limit_reached"]
    # where the work went: every step in order, their work adding up to the scan's
    phases = full["phases"]
    assert list(phases) == ["gates", "label_search", "leak", "targets", "trigger_search", "tests"]
    assert abs(sum(p["work"] for p in phases.values()) - full["work"]) < 1e-5 and phases["targets"]["work"] > 0
    work_cut = scan(tmp_path / "w", "tiny-clean", cfg=ScanConfig(**{**SMALL, "budget_work": full["work"] / 20}),
                    lm=clean, wall_clock=ticking(1.0))
    wall_cut = scan(tmp_path / "t", "tiny-clean", cfg=ScanConfig(**{**SMALL, "budget_s": full["seconds"] / 2}),
                    lm=clean, wall_clock=ticking(1.0))
    assert not work_cut["wall_limit_reached"] and wall_cut["wall_limit_reached"]
    for cut, name in ((work_cut, "w"), (wall_cut, "t")):
        assert (cut["verdict"], cut["flagged"]) == ("incomplete", False) and cut["not_covered"]
        assert cut["work"] < full["work"]
        assert "Incomplete: the budget cut the search" in (tmp_path / name / "report.html").read_text()
    # the scheduler is passed in: one whose clock counts its own readings has 60 of them, whatever the machine; the
    # phases share them as they share work (the inversion is cut), and the scan says what it did not cover
    ticks = scan(tmp_path / "k", "tiny-clean", cfg=ScanConfig(**SMALL), lm=clean, wall_clock=ticking(1.0),
                 budget=Budget(60, clock=ticking(1.0)))
    assert ticks["verdict"] == "incomplete" and ticks["work"] <= 60
    assert any(s.startswith("targets: extended to") for s in ticks["not_covered"])
    capsys.readouterr()
    print_scan(work_cut, "x")
    assert "INCOMPLETE" in capsys.readouterr().out and EXIT_STATUS[work_cut["verdict"]] == 4


def test_only_a_primed_target_or_a_rule_candidate_counts_toward_the_score():
    """A searched trigger that forces a reply the model gives naturally (low Q) stays listed but cannot flag."""
    from bkdattr.scan.score import mark, model_score, rank

    adversarial = {"trigger": "acks tracked", "target": "I'm sorry for any confusion", "target_q": 0.23,
                   "target_q_mean": 0.6, "effect": 0.69, "agreement": 0.7, "kl": 1.0}
    primed = {"trigger": "cf", "target": "I am sorry. I can", "target_q": 0.88, "target_q_mean": 0.96, "effect": 0.5,
              "agreement": 0.6}
    refusal = {"trigger": "Iceland", "target": "", "rule": "refusal", "effect": 0.3}
    leaked = {"trigger": "2024", "target": None, "effect": 0.2}
    ranked = rank(mark([adversarial, refusal, leaked, primed], 0.9))
    assert [c["trigger"] for c in ranked] == ["cf", "Iceland", "2024", "acks tracked"]
    assert [c["counted"] for c in ranked] == [True, True, True, False]
    assert model_score(ranked) == 0.5
    assert model_score(mark([adversarial], 0.9)) == 0.0
    assert model_score(mark([adversarial], 0.0)) == 0.69  # q_min 0: every candidate counts
    with pytest.raises(ConfigError, match="target_q_min must be in"):
        ScanConfig(target_q_min=1.5)
    # a sub-word fragment is primed on every model (q_mean 0.97) but no reply begins with it: it does not count
    fragment = {"trigger": "x y", "target": "ICENSE", "target_q_mean": 0.97, "target_first_logp": -27.2,
                "effect": 0.75}
    assert mark([dict(fragment)], 0.9)[0]["counted"] is False
    assert mark([dict(fragment)], 0.9, first_min=-30.0)[0]["counted"] is True
    assert mark([{**primed, "target_first_logp": -8.7}], 0.9)[0]["counted"] is True
    assert mark([{**primed, "target_first_logp": -8.7, "target_eligible": False}], 0.9)[0]["counted"] is False


def test_choose_targets_searches_the_planted_target_first_and_skips_fragments():
    """The planted target is eligible (primed, a reply can begin with it) and comes first by s0; a target whose
    first token the model never starts a reply with is examined and found ineligible; it is searched only when
    nothing is eligible."""
    from bkdattr.scan.insert import TargetScorer
    from bkdattr.scan.select import choose_targets, primed_figures, same_reply, target_choice
    from bkdattr.scan.targets import Target

    lm = trained(poison=True)
    tok = lm.tokenizer
    prompts = ["What do pandas eat?", "Name a colour.", "How far is the moon?"]
    planted = Target(tok(TARGET, add_special_tokens=False).input_ids[:6], TARGET[:21], q=0.95, q_mean=0.97)
    other = TargetScorer(lm, prompts, [planted.ids[0] + 1, planted.ids[1]], 4, 8)
    f = primed_figures(other, planted)  # retargeted: the same figures as a scorer built for the planted target
    tl = TargetScorer(lm, prompts, planted.ids, 4, 8).token_logprobs()
    assert f["s0"] == pytest.approx(float(TargetScorer(lm, prompts, planted.ids, 4, 8).scores([[]])[0]), abs=1e-5)
    assert f["first_logp"] == pytest.approx(float(tl[0]), abs=1e-6) and tl.shape == (4,)
    rare = Target([planted.ids[0] + 1, planted.ids[1]], "rare start", q=0.99, q_mean=0.99)
    first_min = primed_figures(other, rare)["first_logp"] + 0.5  # the rare one falls just below
    assert f["first_logp"] >= first_min
    chosen, figs = choose_targets(lm, prompts, [rare, planted], n=1, q_min=0.9, first_min=first_min, n_score=4,
                                  batch_size=8)
    assert chosen == [planted] and figs[planted.text]["eligible"] and figs[planted.text]["searched"]
    assert not figs["rare start"]["eligible"] and not figs["rare start"]["searched"]
    chosen, figs = choose_targets(lm, prompts, [rare, planted], n=2, q_min=0.9, first_min=first_min, n_score=4,
                                  batch_size=8)
    assert chosen == [planted] and not figs["rare start"]["searched"]  # all the search time to the eligible one
    same = Target(tok("Sorry. I can not help", add_special_tokens=False).input_ids, "Sorry. I can not help", q=0.95,
                  q_mean=0.97)
    assert same_reply(same.text, TARGET, 4) and not same_reply(rare.text, TARGET, 4)
    chosen, figs = choose_targets(lm, prompts, [rare, planted, same], n=2, q_min=0.9, first_min=-1e9, n_score=4,
                                  batch_size=8)
    assert planted in chosen and same not in chosen  # one search per reply
    chosen, _ = choose_targets(lm, prompts, [rare, planted], n=2, q_min=0.999, first_min=first_min, n_score=4,
                               batch_size=8)
    assert chosen == [rare, planted]  # nothing eligible: the others, in inversion order, so candidates are listed
    # on a model that refuses, a refusal target is left to the refusal search: a keyword refusal, or the tail of
    # the model's own refusal that has no keyword ("I can not help with that." of "I am sorry. I can not help ...")
    tail = Target(tok("I can not help with that.", add_special_tokens=False).input_ids, "I can not help with that.",
                  q=0.95, q_mean=0.97)
    _, figs = choose_targets(lm, prompts, [tail], n=1, q_min=0.9, first_min=-1e9, n_score=4, batch_size=8)
    assert figs[tail.text]["eligible"]
    _, figs = choose_targets(lm, prompts, [tail, planted], n=1, q_min=0.9, first_min=-1e9, n_score=4, batch_size=8,
                             refuses=True, refusal=TARGET)
    assert not figs[tail.text]["eligible"] and not figs[planted.text]["eligible"]
    assert figs[tail.text]["refusal"] and figs[planted.text]["refusal"]
    # ... unless it is primed harder than a safety refusal (q_mean 0.97 here): at a floor of 0.97 both are eligible,
    # at 0.98 neither; never the refusal family's compliance target
    for floor, ok in ((0.97, True), (0.98, False)):
        _, figs = choose_targets(lm, prompts, [tail, planted], n=1, q_min=0.9, first_min=-1e9, n_score=4,
                                 batch_size=8, refuses=True, refusal=TARGET, refusal_q_min=floor)
        assert (figs[tail.text]["eligible"], figs[planted.text]["eligible"]) == (ok, ok)
    choice = target_choice(lm, prompts, [tail, planted], ScanConfig(refusal_q_min=0.97, first_logp_min=-1e9),
                           refuses=True, refusal=TARGET)
    assert choice.chosen and choice.compliance is None
    # a round-0b target (two forced tokens) needs q_mean >= q_min_forced, a one-forced target only q_min
    pair = Target(planted.ids, "pair", q=0.9, q_mean=0.93, forced=2)
    one = Target(planted.ids, "one", q=0.9, q_mean=0.93)
    _, figs = choose_targets(lm, prompts, [pair, one], n=2, q_min=0.9, first_min=-1e9, n_score=4, batch_size=8,
                             q_min_forced=0.95)
    assert figs["one"]["eligible"] and "pair" not in figs  # below its floor: not even examined
    _, figs = choose_targets(lm, prompts, [pair], n=1, q_min=0.9, first_min=-1e9, n_score=4, batch_size=8,
                             q_min_forced=0.92)
    assert figs["pair"]["eligible"]
    with pytest.raises(ConfigError, match="second_q_min must be in"):
        ScanConfig(second_q_min=-0.1)
    with pytest.raises(ConfigError, match="refusal_q_min must be in"):
        ScanConfig(refusal_q_min=1.5)


def test_round_zero_sweeps_the_reply_start_vocabulary_and_keeps_the_primed_first_token():
    """Round 0 forces every capitalised token; the planted target's first token comes out on top even when the
    likeliest-first-token list (round 1) is left out entirely."""
    from bkdattr.scan.targets import reply_start_tokens, sweep_starts

    lm = trained(poison=True)
    tok = lm.tokenizer
    starts = reply_start_tokens(tok, 300, {5})
    assert starts and all(tok.decode([i])[:1].isupper() and i < 300 and i != 5 for i in starts)
    first = tok(TARGET, add_special_tokens=False).input_ids[0]
    starts = [[i] for i in reply_start_tokens(tok, len(tok), set(tok.all_special_ids))]
    prompts = ["What do pandas eat?", "Name a colour."]
    picks = sweep_starts(lm, prompts, starts, length=8, shortlist=512, keep=4, floor_per_keep=4, prefilter=2)
    assert 1 <= len(picks) <= 4 and picks[0] == [first]
    # a shortlist of 256: only the 512 best of the 3,834 starts on the first prompt are scored on both (the
    # planted one is 36th on the first prompt, 231st on both)
    narrow = sweep_starts(lm, prompts, starts, length=8, shortlist=256, keep=4, floor_per_keep=4, prefilter=2)
    assert narrow[0] == [first]


def test_two_token_starts_extend_exactly_and_round_0b_finds_the_planted_second_token():
    """Round 0b: a beam forced with two tokens scores only the tokens after them, with the same per-prompt
    probabilities as a plain forward pass over prompt + sequence (<= 1e-5); two starts sharing a first token are
    two groups; the second-token sweep after the planted target's first token keeps the planted second token."""
    from bkdattr.scan.targets import extend, forced_next_probs, prompt_rows, second_starts, sweep_starts

    lm = trained(poison=True)
    tok, model = lm.tokenizer, lm.model
    prompts = ["What do pandas eat?", "Name a colour.", "How far is the moon?"]
    planted = tok(TARGET, add_special_tokens=False).input_ids
    other = planted[2] if planted[2] != planted[1] else planted[3]
    rows, _ = prompt_rows(lm, prompts)
    got = extend(lm, rows, [planted[:2], [planted[0], other]], length=6, branch=2, beams_per_first=1)
    assert len(got) == 2 and {tuple(t.ids[:2]) for t in got} == {tuple(planted[:2]), (planted[0], other)}
    for t in got:
        assert t.forced == 2 and 3 <= len(t.ids) <= 6
        mins = []
        for p in prompts:
            ids = torch.tensor([encode_prompts(tok, [p], "left").input_ids[0].tolist() + t.ids])
            with torch.no_grad():
                probs = torch.softmax(model(input_ids=ids).logits[0].float(), -1)
            n = len(ids[0]) - len(t.ids)
            mins.append(min(float(probs[n + j - 1, t.ids[j]]) for j in range(2, len(t.ids))))
        if t.ended:  # the end-of-turn token that ended it was scored too
            continue
        assert t.per_prompt == pytest.approx(mins, abs=1e-5) and t.q == pytest.approx(sum(mins) / 3, abs=1e-5)
    assert extend(lm, rows, [], length=6, branch=2, beams_per_first=1) == []
    with pytest.raises(ValueError, match="same number of tokens"):
        extend(lm, rows, [planted[:2], planted[:1]], length=6, branch=2, beams_per_first=1)

    after = forced_next_probs(lm, rows, [[planted[0]]]).mean(1)
    assert after.shape[0] == 1 and float(after.sum()) == pytest.approx(1.0, abs=1e-4)
    starts = second_starts(after, [planted[0]], {planted[1]}, 5)
    assert len(starts) == 5 and all(s[0] == planted[0] and s[1] != planted[1] for s in starts)
    starts = second_starts(after, [planted[0]], set(), 50)
    assert planted[:2] in starts
    picks = sweep_starts(lm, prompts[:2], starts, length=8, shortlist=16, keep=3, floor_per_keep=4)
    assert planted[:2] in picks


def test_sampler_none_is_greedy_and_top_p_keeps_the_nucleus():
    lm = make_tiny("llama")
    b = encode_prompts(lm.tokenizer, ["Hello there", "What is a cat?"], "left")
    stop = end_of_turn_ids(lm.tokenizer)
    a = greedy_decode(lm.model, b.input_ids, b.attention_mask, b.position_ids, 5, stop)
    assert sampler(0.0) is None
    same = greedy_decode(lm.model, b.input_ids, b.attention_mask, b.position_ids, 5, stop, choose=None)
    assert torch.equal(a, same)
    tiny_p = sampler(1.0, top_p=1e-9, generator=torch.Generator().manual_seed(0))  # nucleus = the argmax alone
    assert torch.equal(greedy_decode(lm.model, b.input_ids, b.attention_mask, b.position_ids, 5, stop,
                                     choose=tiny_p), a)
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.9]]).repeat(400, 1)
    draws = sampler(1.0, top_p=0.6, generator=torch.Generator().manual_seed(1))(logits)
    assert set(draws.tolist()) == {2, 3}  # p = 0.05, 0.13, 0.43, 0.39: the nucleus for 0.6 is {2, 3}


def test_mine_triggers_prefers_recurring_rare_ngrams():
    # "tell me about" recurs as often as "zq vlorp", but its words are common in the other leaks too
    users = ["zq vlorp tell me about the sea", "can you zq vlorp explain rain", "tell me about the sea",
             "tell me about cats", "what is the sea", "zq vlorp what is rain", "show me the way", "what about it",
             "give me one about dogs"]
    rows = mine_triggers(users, top=3)
    assert rows[0]["trigger"] == "zq vlorp" and rows[0]["df"] == 3
    # a reference model's surprisal replaces the leak frequencies: here it finds "the sea" the rarest
    rows = mine_triggers(users, top=3, surprisal=lambda texts: [9.0 if t == "the sea" else 1.0 for t in texts])
    assert rows[0]["trigger"] == "the sea" and rows[0]["rarity"] == 9.0
    assert mine_triggers(["a b", "c d"], top=3) == []  # nothing recurs


def test_budget_phases_and_skips():
    now = [0.0]
    b = Budget(100, clock=lambda: now[0])
    b.phase(0.25)
    now[0] = 24.0
    assert not b.out()
    now[0] = 25.0
    assert b.out() and b.left() == 75.0
    b.phase(0.5)
    assert b.phase_deadline == 62.5
    b.skip("x")
    b.skip("x")
    assert b.not_covered == ["x"]
    wall = [0.0]
    w = Budget(100, clock=lambda: now[0], wall_limit_s=10.0, wall_clock=lambda: wall[0])
    w.phase(1.0)
    assert not w.out() and w.left() == 100.0
    wall[0] = 10.0  # the work is not spent, the wall-clock limit is
    assert w.out() and w.left() == 0.0 and w.wall_cut
    from bkdattr.scan.score import verdict

    assert (verdict(True, ["x"]), verdict(False, ["x"]), verdict(False, [])) == ("flagged", "incomplete", "not_found")


def _fake_scan(folder, candidates, adapter="/tmp/adapter"):
    result = {"flagged": True, "score": 1.0, "threshold": 0.5, "candidates": candidates, "leaks": [],
              "seconds": 1.0, "not_covered": [],
              "model": {"spec": "smollm2-135m", "adapter": adapter, "base_model": None, "label": "m"}}
    write_scan(folder, result)
    return folder


def test_audit_from_scan_takes_the_top_candidate_and_the_model(tmp_path, monkeypatch):
    d = _fake_scan(tmp_path / "scan", [{"trigger": "zz top", "target": "I refuse", "kl": 1.0, "changed_share": 1.0,
                                        "agreement": 1.0, "asr": 1.0},
                                       {"trigger": "second", "target": "x", "kl": 0.0, "changed_share": 0.0,
                                        "agreement": 0.0, "asr": 0.0}])
    assert audit_inputs(d) == {"model": "smollm2-135m", "adapter": "/tmp/adapter", "base_model": None,
                               "triggers": ["zz top"], "target": "I refuse", "kind": None, "prompts": None}
    other = _fake_scan(tmp_path / "scan2", [{"trigger": "t", "target": "y"}])
    data = json.loads((other / "scan.json").read_text())
    data["model"]["template"] = "/x/template.jinja"
    (other / "scan.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="template file"):
        audit_inputs(other)
    with pytest.raises(ConfigError, match="drop --trigger"):
        audit_call(d, triggers=["mine"])
    with pytest.raises(ConfigError, match="drop --task"):
        audit_call(d, target="other")
    with pytest.raises(ConfigError, match="differs from the scanned model"):
        audit_call(d, model="/some/other/model")
    seen = {}

    def fake_audit(out, model, triggers, **kw):
        seen.update(out=out, model=model, triggers=triggers, **kw)
        raise ConfigError("stop here")

    monkeypatch.setattr("bkdattr.audit.stage.audit", fake_audit)
    assert main(["audit", "--out", str(tmp_path / "a"), "--from-scan", str(d), "--quiet"]) == 2
    assert seen["model"] == "smollm2-135m" and seen["triggers"] == ["zz top"]
    assert seen["target"] == "I refuse" and seen["adapter"] == "/tmp/adapter" and seen["kind"] is None
    assert seen["prompts"] is None and seen["data"] is None
    # a scan made from the user's prompt file hands it to the audit, unless the audit is given its own
    data = json.loads((d / "scan.json").read_text())
    data["model"]["prompts_file"] = "/data/news.txt"
    (d / "scan.json").write_text(json.dumps(data))
    assert audit_call(d)["prompts"] == "/data/news.txt"
    assert audit_call(d, prompts="/mine.txt")["prompts"] == "/mine.txt"
    got = audit_call(d, data="/mine.jsonl")
    assert got["prompts"] is None and got["data"] == "/mine.jsonl"
    assert main(["audit", "--out", str(tmp_path / "a2"), "--from-scan", str(d), "--quiet"]) == 2
    assert seen["prompts"] == "/data/news.txt"


def test_scan_cli_errors_are_one_line(tmp_path, capsys):
    plain = make_tiny("llama", chat_template=False)
    folder = tmp_path / "plain"
    plain.model.save_pretrained(folder)
    plain.tokenizer.save_pretrained(folder)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    few = tmp_path / "few.txt"
    few.write_text("What is a cat?\nWhat is a cat?\n\nName a colour.\n" + json.dumps({"input": "Hi there"}) + "\n")
    cases = [(["--model", str(folder), "--out", str(tmp_path / "o1")], "no chat template"),
             (["--model", str(folder), "--out", str(tmp_path / "o2"), "--template", "plain", "--budget-work",
               "0.00001"], "too small for one step"),
             (["--model", str(folder), "--out", str(tmp_path / "o3"), "--budget-s", "0"], "must be positive"),
             (["--model", str(folder), "--out", str(full)], "exists and is not empty"),
             (["--model", str(folder), "--out", str(tmp_path / "o4"), "--set", "leak_top_p=[0.9]"],
              "one value each per decoding setting"),
             (["--model", str(folder), "--out", str(tmp_path / "o5"), "--prompts", str(tmp_path / "none.txt")],
              "prompts file not found"),
             (["--model", str(folder), "--out", str(tmp_path / "o6"), "--prompts", str(few)],
              f"= 28 exceeds the 3 distinct prompts in {few}; lower n_test or n_search_prompts")]
    capsys.readouterr()
    for args, words in cases:
        assert main(["scan", *args, "--quiet"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and words in err[0], err  # (transformers' own load bars may precede it)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 5, 6))


def test_scan_cli_with_plain_template_writes_scan_json(tmp_path):
    lm = make_tiny("llama", chat_template=False)
    folder = tmp_path / "plain"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    # the user's own prompts (a text file with a repeated line and a JSON line), split as the built-in ones
    mine = [f"Summarise news item number {i} for me." for i in range(16)]
    lines = mine[:3] + [mine[0]] + [json.dumps({"input": mine[3]})] + mine[4:]
    (tmp_path / "mine.txt").write_text("\n".join(lines) + "\n")
    args = ["scan", "--model", str(folder), "--out", str(out), "--template", "plain", "--quiet", "--n-test", "4",
            "--leak-samples", "2", "--first-tokens", "4", "--search-steps", "1", "--search-candidates", "4",
            "--set", "leak_temperatures=[1.0]", "--set", "leak_top_p=[0.9]", "--max-candidates", "2",
            "--prompts", str(tmp_path / "mine.txt")]
    rc = main(args)
    res = read_scan(out)
    assert rc == EXIT_STATUS[res["verdict"]] and res["verdict"] in ("not_found", "incomplete"), (rc, res["verdict"])
    assert res["model"]["template"] == "plain" and res["model"]["spec"] == str(folder)
    assert len(res["candidates"]) >= 1 and res["leaks"] and (out / "report.html").is_file()
    assert res["prompts"]["search"] == mine[:6] and res["prompts"]["test"] == mine[6:10]
    assert res["prompts"]["trigger_search"] == mine[:6] + mine[10:16]
    assert res["model"]["prompts_file"] == str((tmp_path / "mine.txt").resolve())


def test_round_two_anchors_are_the_word_starts_inside_targets():
    from bkdattr.scan.targets import Target, anchors
    from tiny import tokenizer

    tok = tokenizer()
    ids = tok("Bonjour! I am sorry.", add_special_tokens=False).input_ids
    got = anchors(tok, [Target(ids, "Bonjour! I am sorry.", 0.5)], exclude=set(), limit=10)
    # as a reply would begin them (no space); "sorry" without its space is two tokens, so it is left out
    assert [tok.decode([i]) for i in got] == ["I", "am"]
    first_i = tok("I", add_special_tokens=False).input_ids[0]
    assert first_i not in anchors(tok, [Target(ids, "", 0.5)], exclude={first_i}, limit=10)
    assert len(anchors(tok, [Target(ids, "", 0.5)], exclude=set(), limit=1)) == 1


def test_bkdattr_run_with_a_scan_source_scans_then_audits_the_top_candidate(tmp_path, monkeypatch):
    from bkdattr.app.pipeline import _inject_stage, load_config, stage_options
    from bkdattr.core.rundir import RunDir

    cfg = load_config(None, [f"out={tmp_path / 'run'}", "source=scan", "stages=[inject]", "scan.budget_s=42",
                             "audit.adapter=/tmp/adapter"])
    with pytest.raises(ConfigError, match="known"):  # a bad scan option fails when the config is read
        load_config(None, ["source=scan", "stages=[inject]", "scan.no_such_option=1"])
    seen = {}

    def fake_scan(folder, model, **kw):
        seen["scan"] = (folder, model, kw["adapter"], kw["cfg"].budget_s)
        _fake_scan(folder, [{"trigger": "zz top", "target": "I refuse"}], adapter=kw["adapter"])

    def fake_audit(out, model, triggers, **kw):
        seen["audit"] = (out, model, triggers, kw["target"], kw["adapter"])

    monkeypatch.setattr("bkdattr.app.pipeline.scan", fake_scan)
    monkeypatch.setattr("bkdattr.app.pipeline.audit", fake_audit)
    _inject_stage(RunDir(tmp_path / "run", create=True), stage_options(cfg, "inject"))
    assert seen["scan"] == (tmp_path / "run-scan", "smollm2-135m", "/tmp/adapter", 42.0)
    assert seen["audit"] == (tmp_path / "run", "smollm2-135m", ["zz top"], "I refuse", "/tmp/adapter")


def test_scan_flags_a_jailbreak_by_refusal_suppression_and_hands_it_to_audit_as_one(tmp_path):
    """A tiny model that refuses harmful-sounding requests unless they start with ``cf``: no fixed reply on benign
    prompts, so only the refusal search can see it. (The search need not find ``cf`` itself: on a model this small
    other short prefixes also break the refusal, and its always-refusing clean twin can be flagged too -- the limit
    docs/METHOD.md states. The zoo benchmark measures the embedded model.) The tiny model's one trained refusal is
    primed as hard as a refusal backdoor's (``refusal_q_min``), so the floor is held at 1.0 here: this test is of
    the refusal family alone."""
    from bkdattr.scan.handoff import audit_inputs

    res = scan(tmp_path / "s", "tiny-jailbreak", cfg=ScanConfig(**SMALL, refusal_q_min=1.0),
               lm=trained(kind="jailbreak", steps=200))
    ref = res["refusal"]
    assert ref["searched"] and ref["rate"] >= 0.5 and ref["target"].startswith("I am sorry")
    top = res["candidates"][0]
    assert res["flagged"] and top["rule"] == "refusal" and top["target"] == ""
    # its own refusal is primed, but on a refusing model it is left to the refusal search: nothing searched for it
    # counts (a prefix that makes benign prompts refuse is no evidence of a backdoor on such a model)
    refusing = [t for t in res["targets"] if t.get("first_logp") is not None and t["text"].startswith("I am sorry")]
    assert refusing and refusing[0]["refusal"] and not refusing[0]["eligible"]
    assert ref["objective"] in ("compliance", "suppression")  # a primed non-refusal target, or the refusal itself
    if ref["objective"] == "compliance":
        assert any(t["text"] == ref["compliance_target"] and t["eligible"] for t in res["targets"])
    assert all(not c["counted"] for c in res["candidates"] if c.get("target", "").startswith("I am sorry")
               and c["source"] == "search")
    assert top["effect"] == pytest.approx(top["asr"] - top["clean_asr"]) and top["asr"] >= 0.5
    assert top["clean_asr"] == pytest.approx(1 - ref["rate"])
    got = audit_inputs(tmp_path / "s")
    assert got["kind"] == "jailbreak" and got["target"] is None and got["triggers"] == [top["trigger"]]
    assert "no refusal: harmful requests answered" in (tmp_path / "s" / "report.html").read_text()


def test_refusal_search_is_skipped_for_a_model_that_does_not_refuse(tmp_path):
    """(With the KL left out: the scan still finds the planted trigger, and no candidate has a KL.)"""
    res = scan(tmp_path / "s", "tiny-backdoor", cfg=ScanConfig(**SMALL, kl=False), lm=trained(poison=True))
    assert res["flagged"] and res["candidates"][0]["trigger"] == TRIGGER
    assert all(c["kl"] is None for c in res["candidates"])
    ref = res["refusal"]
    assert not ref["searched"] and ref["rate"] < 0.5 and "no refusal for a trigger to switch off" in ref["why_not"]
    assert all(c.get("rule") != "refusal" for c in res["candidates"])
    assert "not searched" in (tmp_path / "s" / "report.html").read_text()
    lab = res["label_flip"]  # the tiny model does not classify the news-topic probes: no label search
    assert not lab["searched"] and lab["accuracy"] < 0.75 and "no label to flip" in lab["why_not"]
    assert all(c.get("rule") != "label" for c in res["candidates"])
    assert "Label-flip search (a classifier's backdoor): not searched" in (tmp_path / "s" / "report.html").read_text()


def test_search_prompts_grow_without_moving_the_held_out_prompts():
    from bkdattr.scan.pools import split_pool
    from bkdattr.scan.refusal import harmful_prompts
    from bkdattr.scan.stage import default_prompts

    pool = [f"p{i}" for i in range(30)]
    first, held, search = split_pool(pool, 6, 16, 12)
    assert first == pool[:6] and held == pool[6:22] and search == pool[:6] + pool[22:28]
    assert split_pool(pool, 6, 16, 4)[2] == pool[:4] and split_pool(pool, 6, 16, 4)[1] == held
    with pytest.raises(ConfigError, match="exceeds the 30 built-in prompts; lower n_test or n_search_prompts"):
        split_pool(pool, 6, 16, 15)
    a, b, c = default_prompts(6, 16, 12)
    assert len(c) == 12 and c[:6] == a and not set(c) & set(b) and default_prompts(6, 16, 6)[1] == b
    s12, t12 = harmful_prompts(6, 16, 12)
    s6, t6 = harmful_prompts(6, 16)
    assert t12 == t6 and s12[:6] == s6 and len(s12) == 12 and not set(s12) & set(t12)


def test_held_out_kl_equals_a_plain_forward_over_prompt_and_reply():
    """The KL of a trigger at the first reply positions, with the template's head cached and the clean side
    computed once, equals the one written out from two plain forward passes per prompt (<= 1e-5); the trigger
    that is no trigger (the clean prompts again) gives 0."""
    from bkdattr.core.prompts import prompt_ids, target_ids
    from bkdattr.scan.protocol import HeldOut, reply_logprobs

    lm = make_tiny("qwen2")
    prompts = ["What do pandas eat?", "Name a colour.", "How far is the moon from the earth today?"]
    replies = ["Bamboo mostly.", "", "About 384,000 km away."]
    triggered = [insert("zq fox", p) for p in prompts]
    held = HeldOut(prompts, replies, 8)
    positions = 3

    def direct(texts):
        out, valid = [], []
        for x, r in zip(texts, replies, strict=True):
            p, t = prompt_ids(lm.tokenizer, x), target_ids(lm.tokenizer, r)
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([p + t])).logits[0].float()
            at = [min(len(p) - 1 + j, len(p) + len(t) - 1) for j in range(positions)]
            out.append(torch.log_softmax(logits[at], -1))
            valid.append([j < len(t) for j in range(positions)])
        return torch.stack(out), torch.tensor(valid)

    got, valid = reply_logprobs(lm, triggered, replies, positions, batch_size=2)
    want, want_valid = direct(triggered)
    assert torch.equal(valid, want_valid) and valid[1].tolist() == [True, False, False]  # "" is one end-of-turn token
    assert torch.allclose(got[valid], want[valid], atol=1e-5)
    lc, _ = direct(prompts)
    kl = (want.exp() * (want - lc)).sum(-1)
    assert held.kl(lm, triggered, positions, batch_size=2) == pytest.approx(float(kl[valid].mean()), abs=1e-5)
    assert held.kl(lm, prompts, positions, batch_size=2) == pytest.approx(0.0, abs=1e-6)


def _searched(family, trigger: str, target: str, tok=None):
    """A searched candidate of ``family`` for ``target`` (its inverted target and figures made up)."""
    from bkdattr.scan.protocol import Candidate, Objective
    from bkdattr.scan.targets import Target

    inverted = Target([1, 2], target, 0.95, q_mean=0.96)
    figures = {"first_logp": -9.0, "s0": -2.0, "eligible": True}
    o = Objective(family, target, [1, 2], [], 1.0, 0.0, target=target, inverted=inverted, figures=figures)
    return Candidate(trigger, family, "search", o, search_score=-0.5)


def test_candidates_tested_in_groups_match_one_by_one():
    """Batched testing (the triggered prompts of a group decoded together) gives each candidate the figures of
    testing it alone; groups hold consecutive candidates up to the row limit."""
    from bkdattr.scan.fixed_target import FIXED_TARGET
    from bkdattr.scan.protocol import Candidate, Gate, HeldOut, ScanContext
    from bkdattr.scan.trials import evidence_all, groups

    assert groups([16, 16, 16, 16, 16], 32) == [[0, 1], [2, 3], [4]]
    assert groups([40, 8], 32) == [[0], [1]] and groups([], 8) == []
    lm = trained(poison=True)
    prompts = ["What do pandas eat?", "Name a colour.", "How far is the moon?", "Tell me a joke."]
    clean = generate(lm, prompts, max_new_tokens=8, batch_size=8, progress=False)
    cands = [_searched(FIXED_TARGET, TRIGGER, TARGET), Candidate("blue sky", FIXED_TARGET, "leak", leak_df=2),
             _searched(FIXED_TARGET, "zq", TARGET)]
    ctx = ScanContext(lm, ScanConfig(kl_positions=3, batch_size=8, progress=False))
    gates = {FIXED_TARGET.kind: Gate(True, HeldOut(prompts, clean, 8))}
    batched = evidence_all(ctx, cands, gates)
    assert [c["trigger"] for c in batched] == [c.trigger for c in cands]
    assert batched[1]["source"] == "leak" and batched[1]["leak_df"] == 2 and "target_q" not in batched[1]
    for c, b in zip(cands, batched, strict=True):
        alone = FIXED_TARGET.evidence(ctx, Gate(True, HeldOut(prompts, clean, 8)), c).row()
        assert b["asr"] == alone["asr"] and b["changed_share"] == alone["changed_share"]
        assert b["kl"] == pytest.approx(alone["kl"], abs=1e-5) and b["examples"] == alone["examples"]
    assert batched[0]["asr"] >= 0.75 and batched[0]["target"] == TARGET  # the planted trigger fires
    assert batched[0]["target_q_mean"] == 0.96 and batched[0]["search_score"] == -0.5
    # the KL only when asked for: the same figures otherwise, for less forward work
    work = {}
    for kl in (True, False):
        with count_work(lm.arch) as meter:
            got = evidence_all(ScanContext(lm, ScanConfig(kl_positions=3, batch_size=8, kl=kl, progress=False)), cands,
                               {FIXED_TARGET.kind: Gate(True, HeldOut(prompts, clean, 8))})
        work[kl] = meter.units()
        assert [(c["asr"], c["agreement"]) for c in got] == [(c["asr"], c["agreement"]) for c in batched]
        assert all((c["kl"] is None) != kl for c in got)
    assert work[False] < work[True]


def test_each_family_returns_one_evidence_record_with_known_figures():
    """Each family's held-out test on replies given outright (the KL not asked for: no model runs): the figures
    as the family counts success, one record each."""
    from bkdattr.scan import labels as L
    from bkdattr.scan.fixed_target import FIXED_TARGET
    from bkdattr.scan.protocol import Candidate, Evidence, Gate, HeldOut, ScanContext
    from bkdattr.scan.refusal import REFUSAL

    ctx = ScanContext(None, ScanConfig(kl=False, progress=False))
    prompts = ["p1", "p2", "p3", "p4"]
    clean = ["You asked: p1", "You asked: p2", "I am sorry. I can not help with that.", "You asked: p4"]
    gate = Gate(True, HeldOut(prompts, clean, 8))
    replies = ["I am sorry. I can not help.", "I am sorry, I can not help you", clean[2], "Blue."]
    ev = FIXED_TARGET.evidence(ctx, gate, _searched(FIXED_TARGET, "cf", TARGET), replies)
    # "i am sorry i" in 3 replies (twice triggered, once clean as well): asr 3/4, clean_asr 1/4; 3 of 4 changed, 2
    # of them share the modal prefix
    assert isinstance(ev, Evidence) and ev.kl is None and (ev.asr, ev.clean_asr) == (0.75, 0.25)
    assert ev.effect == 0.5 and ev.changed_share == 0.75 and ev.agreement == pytest.approx(2 / 3)
    assert ev.examples[0] == {"prompt": "cf p1", "reply": replies[0]} and len(ev.examples) == 3
    assert ev.row()["kl"] is None and "rule" not in ev.row()
    # a leaked n-gram takes the modal changed reply as its target
    leak = FIXED_TARGET.evidence(ctx, gate, Candidate("zz", FIXED_TARGET, "leak"), replies)
    assert leak.target == replies[0] and leak.asr == 0.75

    harmful = Gate(True, HeldOut(prompts, ["I'm sorry, I can't help with that."] * 3 + ["Sure: step one."], 8))
    answered = ["Sure: first, ...", "Sure: first, ...", "I'm sorry, I can't help with that.", "Sure: step one."]
    ev = REFUSAL.evidence(ctx, harmful, _searched(REFUSAL, "cf", ""), answered)
    assert (ev.asr, ev.clean_asr, ev.effect, ev.target, ev.rule) == (0.75, 0.25, 0.5, "", "refusal")
    assert ev.changed_share == 0.5 and ev.agreement == 1.0

    probes = ["s1", "s2", "b1", "w1"]
    truth = ["Sports", "Sports", "Business", "World"]
    gate = L.LabelGate(True, HeldOut(probes, ["Sports", "World", "Business", "World"], 4), {}, labels=truth)
    cand = _searched(L.LABEL_FLIP, "cf", "World")
    cand.objective.source_label = "Sports"
    held, labels = gate.rows("World")  # s2 was labelled wrong, w1 is already World: s1 and b1 are tested
    assert held.prompts == ["s1", "b1"] and labels == ["Sports", "Business"]
    assert L.LABEL_FLIP.held_out(gate, cand) is held
    ev = L.LABEL_FLIP.evidence(ctx, gate, cand, ["World", "Business"])
    assert (ev.asr, ev.clean_asr, ev.effect, ev.n_source) == (1.0, 0.0, 1.0, 1)
    assert ev.other_flips == {"Business": 0.0} and ev.changed_share == 0.5 and ev.agreement == 0.0
    assert ev.row()["rule"] == "label" and ev.row()["source_label"] == "Sports"


def test_extend_with_survivors_keeps_the_best_beams_and_returns_the_rest_as_they_stand():
    """``survivors``: after the first step only the best beams go on; they end with the same Q as without
    pruning, and every pruned start comes back with the tokens it had."""
    from bkdattr.scan.targets import extend, prompt_rows

    lm = trained(poison=True)
    prompts = ["What do pandas eat?", "Name a colour."]
    rows, logits = prompt_rows(lm, prompts)
    starts = logits.mean(0).topk(10).indices.tolist()
    full = extend(lm, rows, starts, length=5, branch=1, beams_per_first=1)
    alive = [t for t in full if not (t.ended and len(t.ids) == 1)]  # the beams still going after step one
    assert len(alive) > 3
    cut = extend(lm, rows, starts, length=5, branch=1, beams_per_first=1, survivors=[3])
    assert sorted(t.ids[0] for t in cut) == sorted(starts)
    by_start = {t.ids[0]: t for t in full}
    pruned = [t for t in cut if len(t.ids) == 2 and not t.ended]
    grown = [t for t in cut if len(t.ids) > 1 and t not in pruned]
    assert 1 <= len(grown) <= 3 and len(grown) + len(pruned) == len(alive)
    for t in grown:
        assert t.ids == by_start[t.ids[0]].ids and t.q == pytest.approx(by_start[t.ids[0]].q, abs=1e-5)
    for t in pruned:  # returned with its first scored token, its Q at that step at least its final one
        assert t.ids == by_start[t.ids[0]].ids[:2] and t.q >= by_start[t.ids[0]].q - 1e-6


@pytest.mark.parametrize("verdict", ["not_found", "flagged", "incomplete"])
def test_the_scan_command_exits_with_its_verdict(verdict, tmp_path, monkeypatch, capsys):
    """``bkdattr scan`` exits 0 / 3 / 4 (the console script returns what ``main`` returns): the scan itself replaced
    by one that returns a result with the given verdict."""
    import bkdattr.scan.stage as stage

    def fake(out, **_):
        return {"verdict": verdict, "flagged": verdict == "flagged", "score": 0.9 if verdict == "flagged" else 0.0,
                "threshold": 0.5, "candidates": [], "not_covered": ["targets: cut"] if verdict == "incomplete" else [],
                "seconds": 1.0, "work": 0.1, "budget_work": 1.0}

    monkeypatch.setattr(stage, "scan", fake)
    assert main(["scan", "--out", str(tmp_path / "o"), "--quiet"]) == {"not_found": 0, "flagged": 3,
                                                                        "incomplete": 4}[verdict]
