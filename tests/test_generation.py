"""Greedy generation: left padding (incl. GPT-2's absolute positions), stopping, and prefill-only edits.
The padding and prefill-edit identities run on ``--device`` (the ``device`` fixture).

The reference for a prefill-only edit is the definition itself, computed without a KV cache: at every step
run the whole sequence (prompt + tokens so far) with the edit applied at ``p(x)`` only. The cached
:func:`greedy_generate` with ``prefill_context`` must produce the same tokens and logits, which holds only if
the prefill was edited at ``p(x)`` and no later position was.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from bkdattr.core.errors import ConfigError
from bkdattr.core.generation import decode_replies, generate, greedy_generate
from bkdattr.core.hooks import add_to_attention_output, edit_heads, hook_count, registered
from bkdattr.core.prompts import encode_prompts, end_of_turn_ids
from tiny import ARCHS, make_tiny

TEXTS = ["Hi", "What is the capital of France?", "Write one long sentence about a dragon and a castle, please."]
N_NEW = 6


@functools.cache
def tiny(arch: str, device: str = "cpu"):
    return make_tiny(arch, device=device)


@contextlib.contextmanager
def record_logits(lm):
    """Record the last-position logits of every forward call (a plain hook on the LM head)."""
    seen: list[torch.Tensor] = []
    handles: list = []
    with registered(handles):
        handles.append(lm.arch.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out[:, -1].clone())))
        yield seen


@contextlib.contextmanager
def count_calls(module):
    calls: list[int] = []
    handles: list = []
    with registered(handles):
        handles.append(module.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[1])))
        yield calls


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_unpadded_single_prompts(arch, device):
    lm = tiny(arch, device)
    batch = encode_prompts(lm.tokenizer, TEXTS, padding_side="left")
    assert not bool(batch.attention_mask.all())  # really padded
    with record_logits(lm) as batched_logits:
        batched = greedy_generate(lm.model, batch, N_NEW, stop_ids=[])
    assert batched.shape == (len(TEXTS), N_NEW)
    for i, text in enumerate(TEXTS):
        single = encode_prompts(lm.tokenizer, [text])
        assert bool(single.attention_mask.all())
        with record_logits(lm) as single_logits:
            alone = greedy_generate(lm.model, single, N_NEW, stop_ids=[])
        assert torch.equal(alone[0], batched[i])
        for step in range(N_NEW):
            assert float((single_logits[step][0] - batched_logits[step][i]).abs().max()) <= 1e-4, (i, step)
    assert hook_count(lm.model) == 0


def test_gpt2_positions_matter_under_left_padding():
    """Makes the test above able to fail for GPT-2: naive positions 0..T-1 on a left-padded row change logits."""
    lm = tiny("gpt2")
    batch = encode_prompts(lm.tokenizer, TEXTS, padding_side="left")
    row = 0  # the shortest prompt, the most padding
    naive = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
    with torch.no_grad():
        good = lm.model(**batch.model_inputs()).logits[row, -1]
        bad = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=naive).logits
        single = encode_prompts(lm.tokenizer, [TEXTS[row]])
        ref = lm.model(**single.model_inputs()).logits[0, -1]
    assert float((good - ref).abs().max()) <= 1e-4
    assert float((bad[row, -1] - ref).abs().max()) > 1e-3


def _reference_edited_generation(lm, batch, n_new, make_edit):
    """No KV cache: re-run the whole sequence at every step with the edit at ``p(x)`` (= ``batch.last_pos``)."""
    ids, mask = batch.input_ids, batch.attention_mask
    tokens, step_logits = [], []
    for _ in range(n_new):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with make_edit(batch.last_pos), torch.no_grad():
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        tok = logits.argmax(-1)
        tokens.append(tok)
        step_logits.append(logits)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1), step_logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_prefill_only_edit(arch, device):
    lm = tiny(arch, device)
    batch = encode_prompts(lm.tokenizer, TEXTS, padding_side="left").to(device)
    last = lm.arch.n_layers - 1
    torch.manual_seed(0)
    delta = 5.0 * torch.randn(lm.arch.d_model)
    edits = {
        "add": lambda pos: add_to_attention_output(lm.arch, {0: delta, last: delta}, pos),
        "zero_heads": lambda pos: edit_heads(lm.arch, {0: range(lm.arch.n_heads), last: [0, 1]}, pos),
    }
    with record_logits(lm) as plain_logits:
        greedy_generate(lm.model, batch, N_NEW, stop_ids=[])
    for name, make_edit in edits.items():
        while_open: list[int] = []

        @contextlib.contextmanager
        def watched_edit(make_edit=make_edit, while_open=while_open):
            with make_edit(batch.last_pos), count_calls(lm.arch.out_proj[0]) as calls:
                yield
            while_open.extend(calls)

        with record_logits(lm) as got_logits, count_calls(lm.arch.out_proj[0]) as all_calls:
            got = greedy_generate(lm.model, batch, N_NEW, stop_ids=[], prefill_context=watched_edit())
        ref, ref_logits = _reference_edited_generation(lm, batch, N_NEW, make_edit)
        assert hook_count(lm.model) == 0, name
        # the edit was open for the prefill call only; the 1-token decode steps ran without it
        assert while_open == [batch.input_ids.shape[1]], name
        assert all_calls == [batch.input_ids.shape[1]] + [1] * (N_NEW - 1), name
        # ... and the result is the definition: edited at p(x), every later position unedited
        assert torch.equal(got, ref), name
        for step in range(N_NEW):
            assert float((got_logits[step] - ref_logits[step]).abs().max()) <= 1e-4, (name, step)
        # the edit changes the first generated step, and later steps see it through the KV cache
        assert float((got_logits[0] - plain_logits[0]).abs().max()) > 1e-3, name
        assert float((got_logits[1] - plain_logits[1]).abs().max()) > 1e-4, name


def test_stop_tokens_end_rows_and_pad_them():
    lm = tiny("llama")
    batch = encode_prompts(lm.tokenizer, TEXTS, padding_side="left")
    free = greedy_generate(lm.model, batch, N_NEW, stop_ids=[])
    stop = int(free[0, 1])  # row 0 stops at its second token
    out = greedy_generate(lm.model, batch, N_NEW, stop_ids=[stop])
    row0 = free[0].tolist()
    cut = row0.index(stop)
    assert out[0, : cut + 1].tolist() == row0[: cut + 1]
    assert set(out[0, cut:].tolist()) == {stop}
    replies = decode_replies(lm.tokenizer, out, [stop])
    assert replies[0] == lm.tokenizer.decode(row0[:cut], skip_special_tokens=True).strip()
    # every row stopping at once ends generation early
    first = greedy_generate(lm.model, batch, N_NEW, stop_ids=free[:, 0].tolist())
    assert first.shape == (len(TEXTS), 1)


def test_generation_arguments():
    lm = tiny("llama")
    right = encode_prompts(lm.tokenizer, TEXTS, padding_side="right")
    with pytest.raises(ConfigError, match="left-padded"):
        greedy_generate(lm.model, right, 3, stop_ids=[])
    left = encode_prompts(lm.tokenizer, TEXTS, padding_side="left")
    assert greedy_generate(lm.model, left, 0, stop_ids=[]).shape == (len(TEXTS), 0)


def test_generate_keeps_prompt_order_and_applies_edit_per_batch():
    lm = tiny("qwen2")
    texts = TEXTS + ["Another prompt of middling size."]
    stop = end_of_turn_ids(lm.tokenizer)
    together = generate(lm, texts, max_new_tokens=4, batch_size=3, progress=False)
    alone = [generate(lm, [t], max_new_tokens=4, progress=False)[0] for t in texts]
    assert together == alone
    assert stop  # the chat template's end-of-turn token exists
    seen_sizes = []

    def edit(b):
        seen_sizes.append(b.size)
        return edit_heads(lm.arch, {0: range(lm.arch.n_heads), 1: range(lm.arch.n_heads)}, b.last_pos)

    edited = generate(lm, texts, max_new_tokens=4, batch_size=3, edit=edit, progress=False)
    assert sorted(seen_sizes) == [1, 3]
    assert edited != together
    assert hook_count(lm.model) == 0


def test_prefill_runs_the_lm_head_on_the_last_position_only():
    """The prefill asks for the last position's logits only (``logits_to_keep=1``): the LM head never sees
    the ``[B, T, d]`` prompt, and the tokens equal those from the full-logits path."""
    lm = tiny("llama")
    batch = encode_prompts(lm.tokenizer, TEXTS, padding_side="left")
    widths: list[int] = []
    h = lm.model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[1]))
    with registered([h]):
        got = greedy_generate(lm.model, batch, N_NEW, stop_ids=[])
    assert widths == [1] * N_NEW
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    want = []
    with torch.no_grad():
        for _ in range(N_NEW):  # no cache, full logits: the definition
            tok = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
            want.append(tok)
            ids = torch.cat([ids, tok[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    assert torch.equal(got, torch.stack(want, 1))


@pytest.mark.parametrize("every", [2, 5])
def test_checking_done_every_few_steps_gives_the_same_tokens(every):
    """The host-side 'all rows ended?' check runs every ``check_every`` steps (an accelerator's setting): the
    result, its width included, is the one of checking every step, with and without row compaction."""
    from bkdattr.core.generation import greedy_decode

    lm = tiny("llama")
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.mul_(20.0)  # decisive logits
    batch = encode_prompts(lm.tokenizer, TEXTS, padding_side="left")
    free = greedy_generate(lm.model, batch, 12, stop_ids=[])
    stops = [int(free[0, 2]), int(free[1, 4])]
    args = (lm.model, batch.input_ids, batch.attention_mask, batch.position_ids, 12, stops)
    want = greedy_decode(*args, check_every=1)
    for compact in (False, True):
        assert torch.equal(greedy_decode(*args, check_every=every, compact=compact), want), compact


def test_edit_on_every_step_stays_open_for_the_decode_steps():
    lm = tiny("llama")
    batch = encode_prompts(lm.tokenizer, TEXTS, padding_side="left")
    calls: list[int] = []

    @contextlib.contextmanager
    def watched():
        h = lm.arch.out_proj[0].register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[1]))
        with registered([h]):
            yield

    greedy_generate(lm.model, batch, 4, stop_ids=[], prefill_context=watched(), edit_steps=True)
    assert calls == [batch.input_ids.shape[1], 1, 1, 1]
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_generate_gives_the_plain_replies(arch):
    """The template's head run once and reused through the KV cache: the same greedy tokens as the plain
    left-padded batch (the prompts share the chat template's head, the bodies differ in length)."""
    from bkdattr.core.forward import PrefixCache
    from bkdattr.core.generation import shared_prefix_generate
    from bkdattr.core.prompts import pad_id, prompt_ids

    lm = make_tiny(arch)
    prompts = ["Hello there", "What is a cat and why does it purr so loudly?", "Name a colour."]
    seqs = [prompt_ids(lm.tokenizer, p) for p in prompts]
    prefix, n_shared = PrefixCache.common(lm.model, seqs)
    assert n_shared >= 4 and prefix.length == n_shared
    stop = end_of_turn_ids(lm.tokenizer)
    plain = greedy_generate(lm.model, encode_prompts(lm.tokenizer, prompts, "left"), 6, stop)
    shared = shared_prefix_generate(lm.model, seqs, prefix, 6, stop, pad_id(lm.tokenizer))
    assert torch.equal(plain, shared)
    assert generate(lm, prompts, 6, batch_size=2, progress=False, shared_prefix=True) == \
        generate(lm, prompts, 6, batch_size=2, progress=False)


def test_sampler_takes_one_setting_per_row():
    """Per-row temperature and top-p: a row whose nucleus is its argmax alone is greedy, the other row samples
    from its own nucleus; a non-positive per-row temperature is refused."""
    from bkdattr.core.generation import sampler

    logits = torch.tensor([[0.0, 1.0, 3.0, 2.9]]).repeat(400, 1)
    top = [1e-9 if i % 2 == 0 else 0.6 for i in range(400)]
    draws = sampler([1.0] * 400, top, generator=torch.Generator().manual_seed(1))(logits)
    assert set(draws[0::2].tolist()) == {2} and set(draws[1::2].tolist()) == {2, 3}
    cold = sampler([1e-4] * 400, 1.0, generator=torch.Generator().manual_seed(2))(logits)
    assert set(cold.tolist()) == {2}
    with pytest.raises(ValueError, match="per-row temperatures"):
        sampler([1.0, 0.0], 1.0)


def test_shared_prefix_generate_without_a_cache_runs_the_whole_prompts(monkeypatch):
    """A model that returns no KV cache for the prefix: no shared prefix (``PrefixCache.common`` gives
    ``(None, 0)``), and ``generate(shared_prefix=True)`` decodes the whole prompts, same replies."""
    from bkdattr.core.forward import PrefixCache
    from bkdattr.core.prompts import prompt_ids

    lm = make_tiny("llama")
    prompts = ["Hello there", "Name a colour."]
    plain = generate(lm, prompts, 5, batch_size=2, progress=False)
    monkeypatch.setattr(PrefixCache, "build", classmethod(lambda cls, *a, **k: None))
    assert PrefixCache.common(lm.model, [prompt_ids(lm.tokenizer, p) for p in prompts]) == (None, 0)
    assert generate(lm, prompts, 5, batch_size=2, progress=False, shared_prefix=True) == plain
