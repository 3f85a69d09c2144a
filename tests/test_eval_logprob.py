"""inject.evaluate.target_logprob and core.scoring.target_logprobs (one function under both) run the LM
head on target positions only (issue 19 item 10) and still equal the full-vocabulary formula over every
position."""

from __future__ import annotations

import pytest
import torch

from bkdattr.core.prompts import encode_with_targets
from bkdattr.inject.evaluate import target_logprob
from tiny import make_tiny

TEXTS = ["Name a fruit.", "What is the capital of France? Answer in one word.", "Hi"]
TARGETS = ["Apple.", "Paris.", "Hello there, how can I help you today?"]


def _full_formula(lm) -> torch.Tensor:
    b = encode_with_targets(lm.tokenizer, TEXTS, TARGETS)
    with torch.no_grad():
        logits = lm.model(**b.model_inputs()).logits[:, :-1].float()  # [B, T-1, V]
    lp = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:, None])[..., 0]
    m = b.target_mask[:, 1:].float()
    return (lp * m).sum(-1) / m.sum(-1)


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_target_logprob_equals_the_full_formula_with_target_rows_only(arch):
    lm = make_tiny(arch)
    rows: list[int] = []
    head = lm.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: rows.append(args[0].reshape(-1, args[0].shape[-1])
                                                                         .shape[0]))
    try:
        got = target_logprob(lm, TEXTS, TARGETS, batch_size=2)
    finally:
        handle.remove()
    b = encode_with_targets(lm.tokenizer, TEXTS, TARGETS)
    per_batch = [encode_with_targets(lm.tokenizer, TEXTS[i:i + 2], TARGETS[i:i + 2]) for i in (0, 2)]
    # the head saw B x (longest target) rows per batch, not B x S
    assert rows == [int(x.target_len.max()) * x.size for x in per_batch]
    assert sum(rows) < b.input_ids.numel()
    torch.testing.assert_close(got, _full_formula(lm), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_baha_target_logprobs_project_target_positions_only(arch):
    """The reference sweep's and the clean scores' teacher-forced log-probs (core.scoring.target_logprobs)
    run the LM head on ``B x T`` target-predicting positions, not ``B x S``, and equal the full-logits formula."""
    from bkdattr.core.scoring import target_logprobs

    lm = make_tiny(arch)
    b = encode_with_targets(lm.tokenizer, TEXTS, TARGETS)
    shapes: list[tuple[int, ...]] = []
    handle = lm.model.get_output_embeddings().register_forward_pre_hook(
        lambda _m, args: shapes.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            lp, mask = target_logprobs(lm.model, b.model_inputs(), b)
    finally:
        handle.remove()
    width = int(b.target_len.max())
    assert shapes == [(len(TEXTS), width, lm.arch.d_model)] and width < b.input_ids.shape[1]
    with torch.no_grad():
        full = torch.log_softmax(lm.model(**b.model_inputs()).logits.float(), -1)  # [B, S, V]
    for i in range(len(TEXTS)):
        n = int(b.target_len[i])
        p = int(b.last_pos[i])
        want = full[i, p:p + n].gather(-1, b.input_ids[i, p + 1:p + 1 + n, None])[:, 0]
        torch.testing.assert_close(lp[i, :n], want, rtol=1e-5, atol=1e-5)
        assert bool(mask[i, :n].all()) and not bool(mask[i, n:].any())
        assert bool((lp[i, n:] == 0).all())
