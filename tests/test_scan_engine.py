"""The engine pieces the scan runs on, against plain forward passes: the prefixed teacher-forced scorer
(:func:`bkdattr.core.scoring.prefixed_logprobs`, soft-capped as the model's own forward is) and the cached step
function (:class:`bkdattr.core.forward.CachedRows`)."""

from __future__ import annotations

import math

import pytest
import torch

from bkdattr.core.forward import CachedRows, PrefixCache
from bkdattr.core.prompts import encode_prompts, pad_sequences
from bkdattr.core.scoring import prefixed_logprobs, softcapped
from tiny import make_tiny, tiny_gemma2, tokenizer


def _tiny_gemma2():
    """A tiny Gemma-2 with a final logit soft-cap (0.3: inside the random logits' range, so it matters)."""
    return tiny_gemma2(0.3)


def _models():
    lm = make_tiny("llama")
    gemma2, _ = _tiny_gemma2()
    return {"llama": lm.model, "gemma2": gemma2}


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_prefixed_logprobs_equal_a_plain_forward_pass(name, monkeypatch):
    """Rows after a one-row prefix run once, right padded, read at chosen columns: the log-softmax of the model's
    own logits (soft-cap included) over prefix + row, <= 1e-5; ids and input embeddings give the same."""
    model = _models()[name]
    tok = tokenizer()
    prefix = tok("<|im_start|>user\n", add_special_tokens=False).input_ids
    rows = [tok(t, add_special_tokens=False).input_ids for t in ("Name a colour.", "Why is the sky blue today?", "Hi")]
    ids, mask = pad_sequences(rows, tok.pad_token_id, "right")
    at = torch.tensor([[0, len(r) - 1] for r in rows])
    pre = PrefixCache.build(model, torch.tensor([prefix]))
    with torch.no_grad():
        got = prefixed_logprobs(model, ids, mask, at, pre)
        embeds = prefixed_logprobs(model, model.get_input_embeddings()(ids), mask, at, pre)
        for i, r in enumerate(rows):
            full = torch.log_softmax(model(input_ids=torch.tensor([prefix + r])).logits[0].float(), -1)
            want = full[[len(prefix) + int(j) for j in at[i]]]
            assert torch.allclose(got[i], want, atol=1e-5)
    assert got.shape == (3, 2, len(tok)) and torch.allclose(embeds, got, atol=1e-5)
    capped = getattr(model.config, "final_logit_softcapping", None)
    assert (capped is not None) == (name == "gemma2")
    if capped:  # the cap is what makes them agree: without it the scorer reads another model's numbers
        assert float(softcapped(model, torch.tensor([3.0]))) == pytest.approx(0.3 * math.tanh(10.0))
        monkeypatch.setattr("bkdattr.core.scoring.softcapped", lambda m, logits: logits)
        with torch.no_grad():
            uncapped = prefixed_logprobs(model, ids, mask, at, pre)
        assert float((uncapped - got).abs().max()) > 0.1  # 0.45 nats here


def test_prefixed_logprobs_carry_a_gradient_to_the_input_embeddings():
    model = make_tiny("llama").model
    ids, mask = pad_sequences([[5, 6, 7], [8, 9]], 0, "right")
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    lp = prefixed_logprobs(model, emb, mask, torch.tensor([[2], [1]]))
    lp[:, 0, 11].sum().backward()
    assert emb.grad is not None and float(emb.grad[0].abs().sum()) > 0
    assert float(emb.grad[1, 2].abs().sum()) == 0.0  # a padded column feeds nothing the row reads


def test_cached_rows_step_equals_a_full_forward():
    """Prefill left-padded prompts once, repeat the rows per start, step forced tokens (two, then one), narrow to
    chosen rows: the next-token logits equal a plain forward over prompt + tokens (<= 1e-4), and the rows left
    untouched by a step are the same cache."""
    lm = make_tiny("llama")
    tok, model = lm.tokenizer, lm.model
    prompts = ["What do pandas eat?", "Name a colour."]
    batch = encode_prompts(tok, prompts, "left")
    rows, logits = CachedRows.prefill(model, batch)

    def plain(prompt: str, extra: list[int]) -> torch.Tensor:
        ids = encode_prompts(tok, [prompt], "left").input_ids[0].tolist() + extra
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, -1].float()

    for i, p in enumerate(prompts):
        assert torch.allclose(logits[i], plain(p, []), atol=1e-4)
    starts = [[11, 12], [13, 14], [15, 16]]
    state = rows.repeated(len(starts))  # row b * n + i: start b after prompt i
    assert state.size == 6 and rows.size == 2 and rows.mask.shape[1] == batch.input_ids.shape[1]
    out = state.step(torch.tensor(starts).repeat_interleave(2, 0))
    for b, s in enumerate(starts):
        for i, p in enumerate(prompts):
            assert torch.allclose(out[b * 2 + i], plain(p, s), atol=1e-4)
    state.keep(torch.tensor([5, 0]))  # start 2 on prompt 1, start 0 on prompt 0, in that order
    nxt = state.step(torch.tensor([[17], [18]]))
    assert torch.allclose(nxt[0], plain(prompts[1], [15, 16, 17]), atol=1e-4)
    assert torch.allclose(nxt[1], plain(prompts[0], [11, 12, 18]), atol=1e-4)
    again, _ = CachedRows.prefill(model, batch)
    assert torch.allclose(rows.repeated(1).step(torch.tensor([[11], [11]])),
                          again.repeated(1).step(torch.tensor([[11], [11]])), atol=0)  # the prompts' rows unchanged
