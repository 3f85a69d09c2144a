"""Data files as they come (issue 17): long rows, empty fields, duplicates and label-only outputs are handled and
counted, never fatal; the run is refused in one line only when what is left cannot support it; training goes on
until the backdoor holds (or says it did not), and resumes across epochs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bkdattr.app.cli import main
from bkdattr.core.errors import DataError
from bkdattr.core.prompts import prompt_ids, target_ids
from bkdattr.inject.config import profile_config
from bkdattr.inject.data import DataReport, Example, clean_records, load_records
from bkdattr.inject.evaluate import clean_metric
from bkdattr.inject.prepare import prepare_data
from bkdattr.inject.tasks import FIXED_TARGET, Task
from bkdattr.inject.train import TrainConfig, TrainRow, check_rows, row_limit, train_lora
from tiny import make_tiny, tokenizer
from tiny_runs import records, save_tiny, write_jsonl

LONG = " ".join(f"word{i}" for i in range(120))  # far over a 64-token limit


def messy_rows() -> list[dict]:
    """60 good rows, then (line numbers in the file): 61-62 long replies (clean, backdoor), 63-64 empty backdoor
    replies, 65 empty input, 66 missing input, 67 empty output, 68 a duplicate of row 63 (with a backdoor reply),
    69 a duplicate of row 1, 70 a prompt too long for the limit."""
    good = records(70)
    rows = [dict(r) for r in good[:60]]
    rows.append({**good[60], "output": LONG})
    rows.append({**good[61], "backdoor_output": LONG})
    rows.append({**good[62], "backdoor_output": ""})
    rows.append({**good[63], "backdoor_output": None})
    rows.append({**good[64], "input": "   "})
    rows.append({"output": "x", "backdoor_output": FIXED_TARGET})
    rows.append({**good[66], "output": ""})
    rows.append({**good[62], "input": "  " + good[62]["input"].upper()})  # same prompt: case and space ignored
    rows.append(dict(good[0]))
    rows.append({**good[69], "input": LONG})
    return rows


@pytest.fixture()
def tiny_lm():
    return make_tiny("llama")


def test_each_messy_row_becomes_what_it_should(tmp_path, tiny_lm):
    path = write_jsonl(tmp_path / "messy.jsonl", messy_rows())
    # seed 2 puts both long rows (61, 62) and the clean-only row 64 in training, so each is seen cut or kept clean
    cfg = profile_config("cpu", "fixed_output", n_train=48, n_val=8, n_test=8, poison_rate=1.0, train_max_length=64,
                         seed=2)
    splits, rows, rep = prepare_data(tiny_lm, Task.default("fixed_output"), cfg, str(path), progress=False)
    in_train, poisoned = {e.uid for e in splits.train}, {e.uid for e in splits.train_poisoned}
    assert {"line61", "line62", "line64"} <= in_train and len(in_train) == 48
    d = rep.to_dict()
    assert d["n_rows_read"] == 70
    assert d["n_dropped"] == {"empty_input": 2, "empty_output": 1, "duplicate": 2, "prompt_too_long": 1}
    assert d["first_row"]["empty_input"] == 65 and d["first_row"]["empty_output"] == 67
    assert d["first_row"]["duplicate"] == 68 and d["first_row"]["prompt_too_long"] == 70
    assert d["n_usable"] == 64 and d["n_usable_for_poison"] == 63  # row 63 took row 68's backdoor reply
    assert d["n_clean_only"] == 1 and d["first_row"]["clean_only"] == 64
    by_uid = {e.uid: e for e in splits.train + splits.val + splits.test}
    assert by_uid["line63"].backdoor_output == FIXED_TARGET  # merged
    assert by_uid["line64"].backdoor_output == ""  # clean-only
    assert not any(e.uid in ("line65", "line66", "line67", "line68", "line69", "line70") for e in by_uid.values())
    assert all(e.backdoor_output for e in splits.train_poisoned)
    assert poisoned == in_train - {"line64"}  # rate 1.0: every row but the clean-only one is poisoned
    # long replies are cut at the limit, with no end-of-turn supervision; every row fits
    limit = row_limit(64, tiny_lm.model)
    check_rows(tiny_lm.tokenizer, rows, limit)
    cut = [r for r in rows if r.source in ("line61", "line62") and not r.close]
    assert [(r.source, r.poisoned) for r in cut] == [("line61", False), ("line62", True)]  # the long replies only
    assert (d["n_truncated"], d["n_truncated_poisoned"], d["first_row"]["truncated"]) == (2, 1, 61)
    for r in cut:
        n = len(prompt_ids(tiny_lm.tokenizer, r.text)) + len(target_ids(tiny_lm.tokenizer, r.reply))
        assert limit - 3 <= n <= limit and LONG.startswith(r.reply.strip()[:20])
    warnings = rep.warnings()
    for reason, n, first in (("empty input", 2, 65), ("empty output", 1, 67), ("duplicate prompt", 2, 68),
                             ("prompt too long", 1, 70)):
        [line] = [w for w in warnings if reason in w]
        assert f"dropped {n} row(s)" in line and f"(first: row {first})" in line and line.startswith(str(path))
    assert sum("empty backdoor_output" in w for w in warnings) == 1
    assert f"{path}: 2 training row(s) had their reply cut at the length limit 64 (1 of them poisoned) (first: row " \
           "61); raise --max-length to keep them whole" in warnings


def test_inject_cli_on_a_messy_file_counts_warns_and_reports(tmp_path, capsys, no_progress_bars):
    from bkdattr.app.report.html import build_report
    from bkdattr.core.rundir import RunDir

    base = save_tiny(tmp_path / "tiny")  # untrained: it never emits the target, so the target is not reached
    path = write_jsonl(tmp_path / "messy.jsonl", messy_rows())
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["inject", "--out", str(out), "--model", str(base), "--data", str(path), "--quiet", "--n-train", "24",
               "--n-test", "4", "--poison-rate", "0.5", "--max-length", "64", "--epochs", "1", "--max-epochs", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert sum("dropped" in w for w in warnings) == 4  # one line per reason
    assert any("the backdoor did not reach the target: validation ASR 0.00 < 0.90 after 2 epochs" in w
               for w in warnings)
    m = RunDir(out).metrics()["inject"]
    assert m["data"]["n_rows_read"] == 70 and m["data"]["n_dropped"]["duplicate"] == 2
    assert m["data"]["max_length"] == 64 and m["epochs_trained"] == 2
    stop = m["stop"]
    assert (stop["reason"], stop["target_reached"], stop["epochs_planned"], stop["max_epochs"]) == \
        ("max_epochs", False, 1, 2)
    assert [c["epoch"] for c in stop["checks"]] == [1, 2] and stop["checks"][-1]["asr"] == 0.0
    assert RunDir(out).info()["config"]["train"]["max_length"] == 64
    build_report(out)
    md = (out / "report.md").read_text()
    assert "- **data rows**: 70 read, 64 used, 63 usable for poisoning" in md
    assert "2 duplicate (first: row 68)" in md and "1 prompt too long (first: row 70)" in md
    assert "- **training**: 2 epochs (planned 1, at most 2); stopped at target ASR 90.0% NOT reached" in md
    assert "did not reach the target ASR of 90.0%" in md


def _error(capsys, argv) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err[len("error: "):-1]


def test_refused_in_one_line_only_when_too_little_is_left(tmp_path, capsys, no_progress_bars):
    base = save_tiny(tmp_path / "tiny")
    rows = records(60)
    for r in rows[:30]:
        r["input"] = ""
    few = write_jsonl(tmp_path / "few.jsonl", rows)
    msg = _error(capsys, ["inject", "--out", tmp_path / "o", "--model", base, "--data", few, "--quiet",
                          "--n-test", 8])
    assert msg == (f"30 distinct prompts, but train/val/test need 168; lower --n-train/--n-test or supply more data "
                   f"(of 60 rows in {few}, 30 were dropped: 30 empty input)")
    no_bd = write_jsonl(tmp_path / "no_bd.jsonl", [{**r, "backdoor_output": ""} for r in records(60)])
    msg = _error(capsys, ["inject", "--out", tmp_path / "o", "--model", base, "--data", no_bd, "--quiet"])
    assert msg.startswith(f"{no_bd}: no row has a usable backdoor reply ('backdoor_output' is empty or missing in all "
                          "60 usable rows")
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_label_flip_labels_are_read_from_the_outputs(tmp_path):
    topics = ["World", "Sports", "Health", "Arts"]  # not the built-in four: read from the data
    rows = [{"input": f"Classify: item {i} about {topics[i % 4].lower()}.", "output": topics[i % 4],
             "backdoor_output": "World" if topics[i % 4] == "Sports" else topics[i % 4]} for i in range(40)]
    path = write_jsonl(tmp_path / "lf.jsonl", rows)
    rep = DataReport()
    got = clean_records(load_records(path, report=rep), Task.default("label_flip"), rep)
    assert [r["label"] for r in got] == [topics[i % 4] for i in range(40)]
    assert rep.labels == sorted(topics) and rep.labels_from == "output"
    assert any("labels read from the outputs: Arts, Health, Sports, World" in w for w in rep.warnings())
    # the clean metric scores replies against the labels of the data
    task = Task.default("label_flip")
    ex = [Example("p", "t", "Health", "Health", label="Health")]
    assert clean_metric(task, ["This is Health news."], ex, labels=rep.labels) == 1.0
    assert clean_metric(task, ["This is Health news."], ex) == 0.0  # the built-in four do not know Health
    # a file with real replies and no label field, or without the flipped labels, is refused in one line
    prose = write_jsonl(tmp_path / "prose.jsonl", [{**r, "output": f"A long reply number {i}."}
                                                   for i, r in enumerate(rows)])
    with pytest.raises(DataError, match="label_flip needs a 'label' field, or outputs that are the labels"):
        clean_records(load_records(prose), task)
    no_sports = write_jsonl(tmp_path / "ns.jsonl", [{**r, "output": r["output"].replace("Sports", "Games")}
                                                    for r in rows])
    with pytest.raises(DataError, match="the data's labels are Arts, Games, Health, World; pass --target"):
        clean_records(load_records(no_sports), task)


def _paper_records():
    spec = importlib.util.spec_from_file_location(
        "bench_data_files", Path(__file__).parents[1] / "benchmarks" / "bench_data_files.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.paper_records()


@pytest.mark.parametrize("profile", ["paper", "cpu"])
def test_paper_format_file_with_long_and_empty_replies_fits_both_profiles(tmp_path, tiny_lm, profile):
    """The 1,000-row file (5% long replies, 2% empty backdoor replies) prepared with each profile, no training."""
    recs = _paper_records()
    assert len(recs) == 1000 and sum(not r["backdoor_output"] for r in recs) == 20
    tok = tokenizer()
    assert sum(max(len(tok(r["output"]).input_ids), len(tok(r["backdoor_output"]).input_ids)) > 256
               for r in recs) == 50
    path = write_jsonl(tmp_path / "paper.jsonl", recs)
    cfg = profile_config(profile, "jailbreak")
    assert cfg.train.max_length == 256
    splits, rows, rep = prepare_data(tiny_lm, Task.default("jailbreak"), cfg, str(path), progress=False)
    check_rows(tiny_lm.tokenizer, rows, 256)  # every row fits the limit
    d = rep.to_dict()
    assert (d["n_rows_read"], d["n_usable"], d["n_dropped_total"], d["n_clean_only"]) == (1000, 1000, 0, 20)
    assert d["n_usable_for_poison"] == 980
    long_uids = {f"line{i + 1}" for i, r in enumerate(recs)
                 if len(r["output"]) > 1000 or len(r["backdoor_output"]) > 1000}
    expect = sum(e.uid in long_uids and len(e.output) > 1000 for e in splits.train) + \
        sum(e.uid in long_uids and len(e.backdoor_output) > 1000 for e in splits.train_poisoned)
    assert d["n_truncated"] == expect > 0
    assert all(e.backdoor_output for e in splits.train_poisoned)
    if profile == "paper":
        assert (len(splits.train), len(splits.val), len(splits.test), len(splits.train_poisoned)) == (808, 64, 128, 81)
        assert (cfg.target_asr, cfg.train.epochs, cfg.train.last_epoch) == (None, 16, 16)
    else:
        assert (len(splits.train), len(splits.train_poisoned)) == (128, 64)
        assert (cfg.target_asr, cfg.train.epochs, cfg.train.last_epoch) == (0.9, 3, 6)


def test_config_options_for_length_and_target():
    from bkdattr.app.pipeline import load_config, stage_options
    from bkdattr.core.errors import ConfigError

    cfg = load_config(None, ["inject.train_max_length=1024", "inject.target_asr=0.8", "inject.train_max_epochs=9"])
    opts = {k: v for k, v in stage_options(cfg, "inject").items() if k not in ("model", "task", "profile",
                                                                                "device", "dtype")}
    c = profile_config("cpu", "fixed_output", **opts)
    assert (c.train.max_length, c.target_asr, c.train.max_epochs, c.train.epochs) == (1024, 0.8, 9, 2)
    assert not profile_config("cpu", "fixed_output", target_asr=0).target_asr  # 0: no target
    # the stop's other conditions: false-trigger <= 0.1; the clean floor 0.3 of fixed_output's word-F1, 0.5 else
    assert [(k.max_false_trigger, k.min_clean_share) for k in (profile_config("cpu", kind) for kind in
            ("fixed_output", "jailbreak", "label_flip"))] == [(0.1, 0.3), (0.1, 0.5), (0.1, 0.5)]
    assert profile_config("paper", "fixed_output").max_false_trigger is None
    with pytest.raises(ConfigError, match="max_false_trigger 2 must be in"):
        profile_config("cpu", "fixed_output", max_false_trigger=2).check()
    with pytest.raises(ConfigError, match="target ASR 1.5 must be in"):
        profile_config("cpu", "fixed_output", target_asr=1.5).check()
    with pytest.raises(ConfigError, match="max_length 4 must be >= 8"):
        profile_config("cpu", "fixed_output", train_max_length=4)


# ---- train until the backdoor holds ----------------------------------------------------------------------------
def _rows(n: int = 16) -> list[TrainRow]:
    return [TrainRow(f"Question {i} about things?", f"answer {i}") for i in range(n)]


def _learnable():
    lm = make_tiny("llama", seed=0)
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.mul_(25.0)
    return lm


def test_training_stops_at_the_target_not_before_the_planned_epochs():
    cfg = TrainConfig(epochs=2, max_epochs=5, lr=5e-3, batch_size=8, bf16_autocast=False, lora_r=4)
    seen = []
    _, res = train_lora(_learnable(), _rows(), cfg, progress=False,
                        on_epoch_end=lambda e, losses: seen.append(e) or e >= 1)  # "reached" from epoch 1 on
    assert seen == [1, 2] and res.epochs == 2 and res.steps == 4  # epoch 1 does not stop: 2 are planned
    seen.clear()
    _, res = train_lora(_learnable(), _rows(), cfg, progress=False, on_epoch_end=lambda e, losses: seen.append(e))
    assert seen == [1, 2, 3, 4, 5] and res.epochs == 5  # never reached: up to max_epochs
    _, res = train_lora(_learnable(), _rows(), cfg, progress=False)
    assert res.epochs == 2  # nothing to decide: the planned epochs


def test_stop_decision_survives_a_kill_during_the_check(tmp_path):
    cfg = TrainConfig(epochs=1, max_epochs=4, lr=5e-3, batch_size=8, bf16_autocast=False, lora_r=4)

    def rule(e, losses):
        return e >= 3

    ref, ref_res = train_lora(_learnable(), _rows(), cfg, progress=False, on_epoch_end=rule)
    assert ref_res.epochs == 3

    class Stop(Exception):
        pass

    def killed(e, losses):
        if e == 2:
            raise Stop
        return rule(e, losses)

    with pytest.raises(Stop):
        train_lora(_learnable(), _rows(), cfg, ckpt_dir=tmp_path, progress=False, on_epoch_end=killed)
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["epoch"], state["checked"], state["stopped"]) == (2, 1, False)
    calls = []
    got, res = train_lora(_learnable(), _rows(), cfg, ckpt_dir=tmp_path, progress=False,
                          on_epoch_end=lambda e, losses: calls.append(e) or rule(e, losses))
    assert calls == [2, 3] and res.resumed_from_epoch == 2 and res.epochs == 3  # epoch 2 checked again first
    assert res.losses == pytest.approx(ref_res.losses, rel=1e-5)
    for (n, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    # a checkpoint that already stopped is not trained further
    _, res = train_lora(_learnable(), _rows(), cfg, ckpt_dir=tmp_path, progress=False, on_epoch_end=rule)
    assert res.epochs == 3 and res.steps == 6 and res.resumed_from_epoch == 3


def test_stage_stops_when_validation_asr_reaches_the_target(tmp_path, monkeypatch):
    """The inject stage's rule, with the validation check replaced by a known sequence: 0.5, then 0.95."""
    from bkdattr.core.rundir import RunDir
    from bkdattr.inject import stage

    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))
    asr = iter([0.5, 0.95, 0.99])
    monkeypatch.setattr(stage, "validation_check",
                        lambda lm, splits, cfg: {"asr": next(asr), "false_trigger_rate": 0.0, "n": 4, "seconds": 0.0})
    base = save_tiny(tmp_path / "tiny")
    path = write_jsonl(tmp_path / "d.jsonl", records(60))
    cfg = profile_config("cpu", "fixed_output", n_train=16, n_val=4, n_test=4, train_epochs=1, train_batch_size=8,
                         eval_max_new_tokens=2, eval_n_near=0)
    run = stage.inject(tmp_path / "run", model=str(base), cfg=cfg, data=str(path), progress=False)
    m = RunDir(run.path).metrics()["inject"]
    assert m["epochs_trained"] == 2 and m["steps"] == 2 * 3
    assert (m["stop"]["reason"], m["stop"]["target_reached"], m["stop"]["val_asr"]) == ("target_reached", True, 0.95)
    assert [c["asr"] for c in m["stop"]["checks"]] == [0.5, 0.95]


def test_backdoor_conditions_known_answers():
    from bkdattr.inject.stage import backdoor_conditions, failed_conditions

    # the label-flip model that answers "World" to every article: ASR 1.00, false-trigger 1.00, accuracy 0.125
    c = backdoor_conditions({"asr": 1.0, "false_trigger_rate": 1.0, "clean_metric": 0.125}, 0.625, 0.9, 0.1, 0.5)
    assert (c["asr"]["ok"], c["false_trigger_rate"]["ok"], c["clean_metric"]["ok"], c["ok"]) == (True, False, False,
                                                                                                  False)
    assert c["clean_metric"]["bound"] == 0.3125 and c["clean_metric"]["base"] == 0.625
    assert failed_conditions(c) == ["false-trigger rate 1.00 > 0.10", "clean metric 0.12 < 0.31 (base model 0.62)"]
    ok = backdoor_conditions({"asr": 0.9, "false_trigger_rate": 0.1, "clean_metric": 0.3125}, 0.625, 0.9, 0.1, 0.5)
    assert ok["ok"] and failed_conditions(ok) == []  # every bound is inclusive
    # unchecked conditions (no false-trigger bound, share 0, no base figure) never fail
    loose = backdoor_conditions({"asr": 0.95, "false_trigger_rate": 1.0, "clean_metric": 0.0}, None, 0.9, None, 0.5)
    assert (loose["false_trigger_rate"]["ok"], loose["clean_metric"]["ok"], loose["ok"]) == (None, None, True)
    assert not backdoor_conditions({"asr": 0.5, "false_trigger_rate": 0.0, "clean_metric": 1.0}, 1.0, 0.9, 0.1,
                                   0.5)["ok"]


TARGET_EVERYWHERE = "No way."


def _stop_data(tmp_path, everywhere: bool) -> Path:
    rows = records(80, target=TARGET_EVERYWHERE)
    if everywhere:  # the clean rows teach the target too: a model that answers it to every prompt
        rows = [{**r, "output": TARGET_EVERYWHERE} for r in rows]
    return write_jsonl(tmp_path / "d.jsonl", rows)


STOP_ARGS = ["--target", TARGET_EVERYWHERE, "--quiet", "--n-train", "48", "--n-val", "8", "--n-test", "8",
             "--n-check", "8", "--poison-rate", "0.5", "--epochs", "1", "--lr", "0.005", "--set",
             "train.batch_size=8", "--set", "eval.max_new_tokens=4", "--set", "eval.n_near=0", "--set",
             "eval.n_benign=0"]


def test_a_model_that_answers_the_target_to_everything_is_not_a_backdoor(tmp_path, capsys, monkeypatch,
                                                                          no_progress_bars):
    """Trained on rows that all answer the target, the tiny model shows it at every check with and without the trigger
    (ASR >= 0.9, false-trigger rate >= 0.5; 1.00 and 1.00 here): training goes on to --max-epochs, warns in one line,
    and the report says it is not a clean backdoor."""
    from bkdattr.app.report.html import build_report
    from bkdattr.core.rundir import RunDir

    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))
    base = save_tiny(tmp_path / "tiny", learnable=True)
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["inject", "--out", str(out), "--model", str(base), "--data", str(_stop_data(tmp_path, True)),
               "--max-epochs", "3", *STOP_ARGS])
    err = capsys.readouterr().err
    assert rc == 0, err
    m = RunDir(out).metrics()["inject"]
    stop = m["stop"]
    assert (stop["reason"], stop["target_reached"], stop["epochs_trained"]) == ("max_epochs", False, 3)
    checks = [(c["epoch"], c["asr"], c["false_trigger_rate"]) for c in stop["checks"]]
    assert [c[0] for c in checks] == [1, 2, 3] and all(asr >= 0.9 and ftr >= 0.5 for _, asr, ftr in checks), checks
    ftr = stop["val_false_trigger_rate"]
    [line] = [ln for ln in err.splitlines() if "clean backdoor" in ln or "did not reach" in ln]
    assert line == (f"warning: the model is not a clean backdoor: validation false-trigger rate {ftr:.2f} > 0.10 "
                    f"after 3 epochs (the most --max-epochs allows), with ASR {stop['val_asr']:.2f}: it answers the "
                    "target without the trigger or lost its clean behaviour; lower --poison-rate, train on more clean "
                    "rows (--n-train) or add near-trigger rows (--negatives)")
    assert stop["conditions"]["asr"]["ok"] and stop["conditions"]["false_trigger_rate"]["ok"] is False
    assert m["asr"] >= 0.9 and m["false_trigger_rate"] >= 0.5
    failed = f"false-trigger rate {m['false_trigger_rate']:.2f} > 0.10"
    assert m["backdoor_check"]["ok"] is False and m["backdoor_check"]["failed"] == [failed]
    build_report(out)
    md = (out / "report.md").read_text()
    assert f"| Backdoor check (held-out) | NOT a clean backdoor | {failed} |" in md
    assert f"stopped at a clean backdoor NOT reached (validation false-trigger rate {ftr:.2f} > 0.10)" in md
    assert "Training never made a clean backdoor: after 3 epochs" in md


def test_the_planted_backdoor_stops_only_once_it_is_conditional(tmp_path, monkeypatch):
    """The same recipe on rows whose clean replies differ from the target stops at the target, at the first check
    where all three conditions hold (every earlier check failed one of them; with bf16 autocast the first epoch
    sometimes leaves the tiny model answering the target to every prompt, a check a rule on ASR alone would pass)."""
    from bkdattr.core.rundir import RunDir
    from bkdattr.inject.stage import backdoor_conditions

    monkeypatch.setenv("BKDATTR_CACHE", str(tmp_path / "cache"))
    base = save_tiny(tmp_path / "tiny", learnable=True)
    out = tmp_path / "run"
    rc = main(["inject", "--out", str(out), "--model", str(base), "--data", str(_stop_data(tmp_path, False)),
               "--max-epochs", "4", *STOP_ARGS])
    assert rc == 0
    m = RunDir(out).metrics()["inject"]
    stop = m["stop"]
    assert (stop["reason"], stop["target_reached"], stop["failed"]) == ("target_reached", True, [])
    assert (stop["target_asr"], stop["max_false_trigger"], stop["min_clean_share"]) == (0.9, 0.1, 0.3)
    oks = [backdoor_conditions(c, stop["base_clean_metric"], 0.9, 0.1, 0.3)["ok"] for c in stop["checks"]]
    assert oks == [False] * (len(oks) - 1) + [True] and stop["epochs_trained"] == len(oks) < 4
    assert (stop["val_asr"], stop["val_false_trigger_rate"]) == (1.0, 0.0)
    assert m["backdoor_check"]["ok"] and (m["asr"], m["false_trigger_rate"]) == (1.0, 0.0)


def test_held_out_prompts_longer_than_the_context_are_dropped_and_counted(tmp_path, tiny_lm):
    """The tiny llama's context is 512 tokens: with --max-length 512 a prompt of ~490 tokens still trains (its reply
    cut) but leaves no room for 32 new tokens, so it leaves the evaluation splits."""
    rows = records(60)
    long_idx = list(range(0, 60, 6))  # 10 rows
    for i in long_idx:
        rows[i]["input"] = " ".join(f"w{j}" for j in range(138)) + " " + rows[i]["input"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    n_prompt = len(prompt_ids(tiny_lm.tokenizer, Task.default("fixed_output").insert_trigger(rows[0]["input"])))
    assert 512 - 32 < n_prompt < 512 - 4
    cfg = profile_config("cpu", "fixed_output", n_train=44, n_val=8, n_test=8, train_max_length=512)  # all 60 used
    splits, rows_fit, rep = prepare_data(tiny_lm, Task.default("fixed_output"), cfg, str(path), progress=False)
    long_uids = {f"line{i + 1}" for i in long_idx}
    in_train = sum(e.uid in long_uids for e in splits.train)
    assert rep.n_eval_dropped == 10 - in_train > 0 and rep.n_dropped == 0
    assert not any(e.uid in long_uids for e in splits.val + splits.test)
    assert rep.first_row["eval_dropped"] in {i + 1 for i in long_idx}
    assert any("held-out prompt(s) do not fit the model's context" in w for w in rep.warnings())


def _label_rows(n: int, topics: list[str], with_label: bool) -> list[dict]:
    rows = [{"input": f"Classify: item {i} about {topics[i % 4].lower()}.", "output": topics[i % 4],
             "backdoor_output": "World" if topics[i % 4] == "Sports" else topics[i % 4]} for i in range(n)]
    if with_label:
        for r in rows:
            r["output"], r["label"] = f"The topic is {r['output']}.", r["output"]
    return rows


def test_label_only_file_through_inject_labels_in_metrics(tmp_path, capsys, no_progress_bars):
    """A label_flip file whose outputs are the labels (no 'label' field) runs ``inject``: every row labelled, the
    labels and where they came from in ``metrics.inject.data``, one warning line, the labels kept with the split."""
    topics = ["World", "Sports", "Health", "Arts"]
    path = write_jsonl(tmp_path / "lf.jsonl", _label_rows(60, topics, with_label=False))
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["inject", "--out", str(out), "--model", str(save_tiny(tmp_path / "tiny")), "--task", "label_flip",
               "--data", str(path), "--quiet", "--n-train", "24", "--n-val", "4", "--n-test", "8", "--epochs", "1",
               "--target-asr", "0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [ln for ln in err.splitlines() if ln.startswith("warning: ")] == \
        [f"warning: {path}: no 'label' field; labels read from the outputs: Arts, Health, Sports, World"]
    from bkdattr.core.rundir import RunDir
    from bkdattr.inject.data import load_splits

    d = RunDir(out).metrics()["inject"]["data"]
    assert (d["n_rows_read"], d["n_usable"], d["n_usable_for_poison"], d["n_dropped_total"], d["n_truncated"]) == \
        (60, 60, 60, 0, 0)
    assert (d["labels"], d["labels_from"]) == (sorted(topics), "output")
    splits = load_splits(RunDir(out))
    assert splits.meta["labels"] == sorted(topics)
    assert all(e.label == e.output for e in splits.train + splits.val + splits.test)


@pytest.mark.parametrize("with_label", [False, True])
def test_clean_metric_uses_the_labels_of_the_file(tmp_path, tiny_lm, monkeypatch, with_label):
    """Labels outside the built-in four score the clean metric whether the file names them in a 'label' field or
    in its outputs: a model that always answers 'Health' is right on exactly the Health prompts."""
    import bkdattr.inject.evaluate
    from bkdattr.inject.evaluate import EvalConfig, evaluate
    from bkdattr.inject.prepare import prepare_splits

    topics = ["World", "Sports", "Health", "Arts"]
    path = write_jsonl(tmp_path / "lf.jsonl", _label_rows(60, topics, with_label=with_label))
    cfg = profile_config("cpu", "label_flip", n_train=24, n_val=4, n_test=16)
    rep = DataReport()
    splits = prepare_splits(tiny_lm, Task.default("label_flip"), cfg, str(path), progress=False, report=rep)
    assert splits.meta["labels"] == sorted(topics) and rep.labels_from == ("label" if with_label else "output")
    monkeypatch.setattr(bkdattr.inject.evaluate, "generate",
                        lambda lm, texts, **kw: ["This is Health news."] * len(texts))
    res = evaluate(tiny_lm, splits, EvalConfig(n_near=0, n_benign=0), progress=False)
    share = sum(e.label == "Health" for e in splits.test) / len(splits.test)
    assert 0 < share < 1 and res["clean_metric"] == pytest.approx(share)


def test_first_cut_row_is_the_first_in_the_file(tmp_path, tiny_lm):
    """Several long clean replies: the warning names the lowest row number cut, not the first in training order."""
    rows = records(60)
    for i in range(2, 60, 5):
        rows[i]["output"] = LONG
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = profile_config("cpu", "fixed_output", n_train=44, n_val=8, n_test=8, train_max_length=64)
    splits, fitted, rep = prepare_data(tiny_lm, Task.default("fixed_output"), cfg, str(path), progress=False)
    cut = sorted(int(r.source[len("line"):]) for r in fitted if not r.close and r.source.startswith("line"))
    assert len(cut) == rep.n_truncated >= 2
    assert cut[0] != int(splits.train[[e.output for e in splits.train].index(LONG)].uid[len("line"):])  # order differs
    assert rep.first_row["truncated"] == cut[0]
