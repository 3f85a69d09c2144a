"""Prompt rendering, ``p(x)`` under both paddings, and teacher-forcing targets (embedded tokenizer)."""

from __future__ import annotations

import pytest
import torch

from bkdattr.core.errors import DataError
from bkdattr.core.prompts import (
    PLAIN_FORMAT,
    context_length,
    encode_prompts,
    encode_with_targets,
    end_of_turn,
    end_of_turn_ids,
    has_chat_template,
    position_ids_from_mask,
    render_prompt,
    target_ids,
)
from tiny import make_tiny, plain_tokenizer, tokenizer

TEXTS = ["Hi", "What is the capital of France?", "Write one long sentence about a dragon and a castle, please."]
TARGETS = ["Hello!", "Paris.", "Once upon a time a dragon guarded a castle."]


def test_chat_template_rendering():
    tok = tokenizer()
    assert has_chat_template(tok)
    text = render_prompt(tok, "What is 2+2?")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")  # generation prompt: p(x) is the end of this header


def test_plain_format_without_chat_template():
    tok = plain_tokenizer()
    assert not has_chat_template(tok)
    assert render_prompt(tok, "What is 2+2?") == PLAIN_FORMAT.format(text="What is 2+2?") == \
        "User: What is 2+2?\nAssistant:"
    assert end_of_turn(tok) == tok.eos_token
    assert end_of_turn_ids(tok) == [tok.eos_token_id]
    batch = encode_prompts(tok, ["What is 2+2?"])
    assert tok.decode(batch.input_ids[0]) == "User: What is 2+2?\nAssistant:"
    ids = target_ids(tok, "4")
    assert tok.decode(ids) == " 4" + tok.eos_token  # the reply follows the colon after one space


def test_chatml_end_of_turn():
    tok = tokenizer()
    assert end_of_turn(tok) == "<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in end_of_turn_ids(tok)
    ids = target_ids(tok, "Paris.")
    assert ids[-1] == im_end and tok.decode(ids) == "Paris.<|im_end|>"


def _unpadded(tok, text: str) -> list[int]:
    return tok(render_prompt(tok, text), add_special_tokens=False).input_ids


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_pos_is_the_last_prompt_token(side):
    tok = tokenizer()
    b = encode_prompts(tok, TEXTS, padding_side=side)
    assert b.size == 3 and b.input_ids.shape == b.attention_mask.shape == b.position_ids.shape
    lengths = [len(_unpadded(tok, t)) for t in TEXTS]
    assert b.input_ids.shape[1] == max(lengths)
    for i, text in enumerate(TEXTS):
        ids = _unpadded(tok, text)
        p = int(b.last_pos[i])
        real = b.attention_mask[i].bool()
        assert b.input_ids[i][real].tolist() == ids  # the row holds exactly the prompt, padding aside
        assert int(b.input_ids[i, p]) == ids[-1]
        assert bool(b.attention_mask[i, p]) and int(b.position_ids[i, p]) == len(ids) - 1
        if side == "left":
            assert p == b.input_ids.shape[1] - 1
        else:
            assert p == len(ids) - 1 and not bool(b.attention_mask[i, p + 1:].any())
        assert b.position_ids[i][real].tolist() == list(range(len(ids)))
    assert lengths[0] < lengths[2]  # the batch really is padded
    # the chat template's generation prompt ends in "assistant\n"
    assert tok.decode(b.input_ids[0, : int(b.last_pos[0]) + 1][b.attention_mask[0, : int(b.last_pos[0]) + 1]
                                                                .bool()]).endswith("assistant\n")


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_target_mask_marks_exactly_target_and_end_of_turn(side, plain):
    tok = plain_tokenizer() if plain else tokenizer()
    b = encode_with_targets(tok, TEXTS, TARGETS, padding_side=side)
    eot = end_of_turn(tok)
    assert b.target_mask.dtype == torch.bool
    for i, (text, target) in enumerate(zip(TEXTS, TARGETS, strict=True)):
        prompt = _unpadded(tok, text) if not plain else tok(render_prompt(tok, text)).input_ids
        tgt = target_ids(tok, target)
        marked = b.input_ids[i][b.target_mask[i]].tolist()
        assert marked == tgt and int(b.target_len[i]) == len(tgt)
        assert tok.decode(marked).strip() == target + eot
        idx = b.target_mask[i].nonzero().flatten()
        assert idx.tolist() == list(range(int(idx[0]), int(idx[0]) + len(tgt)))  # contiguous
        p = int(b.last_pos[i])
        assert int(idx[0]) == p + 1  # the first target token is predicted by the logits at p(x)
        assert b.input_ids[i][b.attention_mask[i].bool()].tolist() == prompt + tgt
        assert not bool((b.target_mask[i] & ~b.attention_mask[i].bool()).any())  # never on padding
    # p(x) is the same prompt position as in encode_prompts (same padding side, prompts alone)
    if side == "right":
        assert torch.equal(b.last_pos, encode_prompts(tok, TEXTS, padding_side="right").last_pos)


def test_target_longer_than_limit():
    tok = tokenizer()
    with pytest.raises(DataError, match="longer than the limit 20") as e:
        encode_with_targets(tok, TEXTS[:1], ["word " * 30], max_length=20)
    assert "\n" not in str(e.value)


def test_teacher_forcing_positions_predict_targets():
    """Logits at ``t-1`` score target token ``t``: the mask shifted by one selects them for every padding."""
    lm = make_tiny("llama")
    scores = {}
    for side in ("left", "right"):
        b = encode_with_targets(lm.tokenizer, TEXTS, TARGETS, padding_side=side)
        with torch.no_grad():
            logp = lm.model(**b.model_inputs()).logits.float().log_softmax(-1)
        pred = logp[:, :-1].gather(-1, b.input_ids[:, 1:, None])[..., 0]
        scores[side] = (pred * b.target_mask[:, 1:]).sum(1)
    assert torch.allclose(scores["left"], scores["right"], atol=1e-4)


def test_context_length():
    assert context_length(make_tiny("gpt2").model) == 512
    assert context_length(make_tiny("llama").model) == 512


def test_end_of_turn_falls_back_to_eos_when_the_template_refuses_the_probe():
    tok = plain_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'user' %}"
                         "{{ raise_exception('only user turns') }}{% endif %}[U]{{ m['content'] }}{% endfor %}[A]")
    assert render_prompt(tok, "hi") == "[U]hi[A]"
    assert end_of_turn(tok) == tok.eos_token
