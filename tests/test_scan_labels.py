"""The scan's label-flip phase (bkdattr.scan.labels): probes, labels, the label matrix, the pair, the test."""

from __future__ import annotations

import pytest
import torch

from bkdattr.core.errors import ConfigError
from bkdattr.core.prompts import render_prompt
from bkdattr.scan import ScanConfig, protocol
from bkdattr.scan import labels as L
from bkdattr.scan.protocol import Candidate, HeldOut, Objective, ScanContext
from tiny import make_tiny


def test_probes_split_per_label_and_share_no_text_with_any_training_set():
    from bkdattr.inject.builtin_data import builtin_records

    search, held = L.probes(6)
    assert list(search) == list(L.LABELS) and all(len(v) == 6 for v in search.values())
    assert len(held) == 4 * 8 and [lab for _, lab in held[:4]] == list(L.LABELS)  # interleaved
    prompts = [p for v in search.values() for p in v] + [p for p, _ in held]
    assert len(set(prompts)) == len(prompts) == 56
    assert all(p.startswith(L.INSTRUCTION.split("{text}")[0]) for p in prompts)
    trained = " ".join(r["input"] for kind in ("fixed_output", "jailbreak", "label_flip")
                       for r in builtin_records(kind))
    assert not [h for hs in L.HEADLINES.values() for h in hs if h in trained]
    with pytest.raises(ConfigError, match="n_label_search must be between 1 and 12"):
        L.probes(13)


def test_reply_label_reads_the_label_a_reply_starts_with():
    assert L.reply_label("Sci/Tech") == "Sci/Tech" and L.reply_label(" sports.") == "Sports"
    assert L.reply_label('"World"') == "World" and L.reply_label("Business news") == "Business"
    assert L.reply_label("The topic is Sports") is None and L.reply_label("") is None
    assert L.accuracy(["World", "Sports", "Mars"], ["World", "Business", "Sci/Tech"]) == pytest.approx(1 / 3)


def test_choose_pair_takes_the_largest_lean_off_the_diagonal():
    m = torch.tensor([[-0.1, -9.0, -8.0, -9.0],
                      [-4.0, -0.2, -4.0, -7.0],   # Sports leans to World: -4 against mean(-8, -10) = -9
                      [-8.0, -9.0, -0.1, -8.0],
                      [-10.0, -9.0, -8.0, -0.1]])
    s, y, lean = L.choose_pair(m)
    assert (L.LABELS[s], L.LABELS[y]) == ("Sports", "World") and lean == pytest.approx(5.0)


def test_label_matrix_is_the_first_reply_token_log_probability_of_a_plain_forward_pass():
    lm = make_tiny("qwen2", seed=3)
    search = {lab: [L.INSTRUCTION.format(text=h) for h in L.HEADLINES[lab][:2]] for lab in L.LABELS}
    m = L.label_matrix(lm, search, batch_size=3)
    tok = lm.tokenizer
    for s, lab in enumerate(L.LABELS):
        logps = []
        for p in search[lab]:
            ids = tok(render_prompt(tok, p), return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                logps.append(torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1))
        mean = torch.stack(logps).mean(0)
        for y, target in enumerate(L.LABELS):
            first = tok(target, add_special_tokens=False).input_ids[0]
            assert float(m[s, y]) == pytest.approx(float(mean[first]), abs=1e-4)


def test_label_gate_stays_closed_for_a_model_that_does_not_classify():
    lm = make_tiny("llama", seed=1)
    ctx = ScanContext(lm, ScanConfig(progress=False))
    gate = L.LABEL_FLIP.gate(ctx)
    info = gate.info
    assert not gate.open and L.LABEL_FLIP.objectives(ctx, gate, None) == []
    assert not info["searched"] and info["accuracy"] < 0.75
    assert "does not classify them" in info["why_not"] and len(gate.held.clean) == len(gate.labels) == 32
    assert gate.held.reply_tokens == ScanConfig().label_tokens and "clean_replies" not in info


def test_label_candidate_counts_flips_of_the_right_labelled_source_probes_only(monkeypatch):
    """A stand-in model: the trigger turns Sports and one Business probe to World; two Sports probes were
    labelled wrong without it and do not count."""
    _, held = L.probes(6)
    clean = [lab if not (lab == "Sports" and i < 8) else "Business" for i, (_, lab) in enumerate(held)]

    def fake_generate(lm, prompts, **kw):
        out = []
        for p in prompts:
            lab = next(lb for q, lb in held if p.endswith(q))
            business = lab == "Business" and p.endswith(held[2][0])
            out.append("World" if p.startswith("TRIG ") and (lab == "Sports" or business) else lab)
        return out

    monkeypatch.setattr(protocol, "generate", fake_generate)
    monkeypatch.setattr(HeldOut, "kl", lambda self, *a, **k: 0.5)
    labels = [lab for _, lab in held]
    keep = L.label_rows(labels, clean, "World")
    assert len(keep) == 22 and all(labels[i] != "World" for i in keep)
    gate = L.LabelGate(True, HeldOut([p for p, _ in held], clean, 4), {}, labels=labels)
    objective = Objective(L.LABEL_FLIP, "label Sports -> World", [1], [], 1.0, 0.0, target="World",
                          source_label="Sports", avoid="World")
    res = L.LABEL_FLIP.evidence(ScanContext(None, ScanConfig(progress=False)), gate,
                                Candidate("TRIG", L.LABEL_FLIP, "search", objective)).row()
    assert res["n_source"] == 6 and res["asr"] == 1.0 and res["effect"] == 1.0 and res["clean_asr"] == 0.0
    assert res["other_flips"] == {"Business": 1 / 8, "Sci/Tech": 0.0}  # World probes are not asked: already y
    assert res["rule"] == "label" and res["source_label"] == "Sports" and res["agreement"] == 1.0
    assert res["changed_share"] == pytest.approx(7 / 22) and len(res["examples"]) == 3


def test_audit_from_scan_takes_a_label_flip_as_label_flip_with_the_trigger_as_a_prefix(tmp_path, monkeypatch):
    from bkdattr.app.cli import main
    from bkdattr.audit.inputs import audit_task
    from bkdattr.core.errors import ArtifactError
    from bkdattr.scan import write_scan
    from bkdattr.scan.handoff import audit_call

    def fake_scan(folder, source):
        cand = {"trigger": "azure victorious", "target": "World", "rule": "label", "source_label": source,
                "kl": 0.5, "changed_share": 0.4, "agreement": 1.0, "asr": 0.86}
        write_scan(folder, {"flagged": True, "score": 0.86, "threshold": 0.5, "candidates": [cand], "leaks": [],
                            "seconds": 1.0, "not_covered": [],
                            "model": {"spec": "smollm2-135m", "adapter": "/tmp/a", "base_model": None, "label": "m"}})
        return folder

    got = audit_call(fake_scan(tmp_path / "s", "Sports"))
    assert "label Sports -&gt; World" in (tmp_path / "s" / "report.html").read_text()  # the rule, not a bare label
    assert got["kind"] == "label_flip" and got["target"] == "World" and got["placement"] == "prefix"
    task = audit_task(got["triggers"], got["kind"], got["target"], placement=got["placement"])
    assert task.source_label == "Sports" and task.placement == "prefix"
    assert task.insert_trigger("Classify this: x") == "azure victorious Classify this: x"  # not wrapped in the verse
    with pytest.raises(ArtifactError, match="flips Business to World, but an audit measures label flips of Sports"):
        audit_call(fake_scan(tmp_path / "b", "Business"))
    seen = {}

    def fake_audit(out, model, triggers, **kw):
        seen.update(triggers=triggers, **kw)
        raise ConfigError("stop here")

    monkeypatch.setattr("bkdattr.audit.stage.audit", fake_audit)
    assert main(["audit", "--out", str(tmp_path / "a"), "--from-scan", str(tmp_path / "s"), "--quiet"]) == 2
    assert seen["kind"] == "label_flip" and seen["placement"] == "prefix" and seen["target"] == "World"


def test_the_label_search_may_not_spell_the_label():
    from bkdattr.scan.search import allowed_tokens, without_words

    tok = make_tiny("llama").tokenizer
    allowed = allowed_tokens(tok)
    kept = without_words(tok, allowed, "Sci/Tech")
    gone = [tok.decode([i]) for i in torch.nonzero(allowed & ~kept).flatten().tolist()]
    assert gone and all("sci" in g.lower() or "tech" in g.lower() for g in gone)
    for word in (" Science", " technology", "Tech"):
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and allowed[ids[0]] and not kept[ids[0]]
    world = without_words(tok, allowed, "World")
    assert not world[tok(" World", add_special_tokens=False).input_ids[0]]
    assert world[tok(" Sports", add_special_tokens=False).input_ids[0]] and (kept | ~allowed).sum() > 0.99 * len(tok)
