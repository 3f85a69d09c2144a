"""The chat-template object (:class:`bkdattr.core.template.Template`): known answers on ChatML (the embedded
model's template and the tiny backdoor's), the plain format and a Gemma-style template. The literals were taken
from the three probes it replaced (the end-of-turn marker probe of ``core.prompts``, the scan's head/tail split
and the guard's header detection) before they went, so the token ids every stage reads stay the same."""

from __future__ import annotations

import copy

import pytest
import torch

from bkdattr.core.prompts import encode_prompts, encode_with_targets, end_of_turn, end_of_turn_ids
from bkdattr.core.template import Template, prompt_positions
from tiny import plain_tokenizer, tokenizer
from tiny_backdoor import TEMPLATE

#: Gemma's chat template (BOS in the text, "model" for the assistant, trimmed content), on the shared tokenizer
GEMMA = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
         "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
         "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHATML_HEADER = [2, 198, 1, 520, 9531, 198]  # "<|im_end|>" "\n" "<|im_start|>" "ass" "istant" "\n"
KNOWN = {
    "chatml": dict(head=SYSTEM + "<|im_start|>user\n", tail="<|im_end|>\n<|im_start|>assistant\n",
                   head_ids=[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
                             407, 19712, 8182, 2, 198, 1, 4093, 198],
                   header_ids=CHATML_HEADER, end_of_turn="<|im_end|>", end_of_turn_ids=[2]),
    "tiny_chatml": dict(head="<|im_start|>user\n", tail="<|im_end|>\n<|im_start|>assistant\n", head_ids=[1, 4093, 198],
                        header_ids=CHATML_HEADER, end_of_turn="<|im_end|>", end_of_turn_ids=[2]),
    # "User: " ends in a space token of its own (216); the shared tokenizer adds no BOS; end of turn is EOS
    "plain": dict(head="User: ", tail="\nAssistant:", head_ids=[11126, 42, 216], header_ids=[198, 9519, 9531, 42],
                  end_of_turn="<|im_end|>", end_of_turn_ids=[2]),
    # the shared tokenizer has no Gemma tokens, so the markers split into pieces; the header is the common suffix
    # of the four probes, which reaches back into "<end_of_turn>" (every user text ends with it)
    "gemma": dict(head="<|im_start|><start_of_turn>user\n", tail="<end_of_turn>\n<start_of_turn>model\n",
                  head_ids=[1, 44, 3738, 79, 1714, 79, 20589, 46, 4093, 198],
                  header_ids=[486, 79, 1714, 79, 20589, 46, 198, 44, 3738, 79, 1714, 79, 20589, 46, 3980, 198],
                  end_of_turn="<end_of_turn>", end_of_turn_ids=[2]),
}


def _tokenizer(name: str):
    if name == "chatml":
        return tokenizer()
    if name == "plain":
        return plain_tokenizer()
    tok = copy.deepcopy(tokenizer())
    tok.chat_template = TEMPLATE if name == "tiny_chatml" else GEMMA
    return tok


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_template_fields_are_the_known_token_ids(name):
    tok = _tokenizer(name)
    t = Template.of(tok)
    want = KNOWN[name]
    assert (t.head, t.tail, t.end_of_turn) == (want["head"], want["tail"], want["end_of_turn"])
    assert list(t.head_ids) == want["head_ids"] and list(t.header_ids) == want["header_ids"]
    assert list(t.end_of_turn_ids) == want["end_of_turn_ids"] == end_of_turn_ids(tok)
    assert end_of_turn(tok) == want["end_of_turn"] and t.chat == (name != "plain")
    # a rendered prompt is the head, the user text and the tail; it ends with the header
    b = encode_prompts(tok, ["Name a colour."], "left")
    assert b.input_ids[0, -len(t.header_ids):].tolist() == list(t.header_ids)


def test_template_is_cached_per_tokenizer_until_its_template_changes():
    tok = copy.deepcopy(tokenizer())
    chatml = Template.of(tok)
    assert Template.of(tok) is chatml
    tok.chat_template = GEMMA  # the scan sets a template after loading: the object follows it
    gemma = Template.of(tok)
    assert gemma.end_of_turn == "<end_of_turn>" and list(gemma.head_ids) == KNOWN["gemma"]["head_ids"]
    tok.chat_template = None
    assert Template.of(tok).tail == "\nAssistant:"
    assert Template.probe(tokenizer()) == chatml  # probing again gives equal fields


@pytest.mark.parametrize("name", ["chatml", "plain", "gemma"])
def test_prompt_positions_find_p_x_in_prompts_and_in_teacher_forced_rows(name):
    tok = _tokenizer(name)
    t = Template.of(tok)
    texts, replies = ["Hi.", "Write one sentence about cats.", "Why?"], ["Sure, here.", "Cats nap.", "Because."]
    b = encode_prompts(tok, texts, "left")
    assert t.prompt_positions(b.input_ids, b.attention_mask).tolist() == [b.input_ids.shape[1] - 1] * 3
    for side in ("right", "left"):
        tf = encode_with_targets(tok, texts, replies, padding_side=side)
        assert t.prompt_positions(tf.input_ids, tf.attention_mask).tolist() == tf.last_pos.tolist()
    # no header in the row (embeddings only, or a row too short): the last attended column
    mask = torch.tensor([[0, 1, 1, 0]])
    assert prompt_positions(t.header_ids, None, mask).tolist() == [2]


def test_a_template_that_rewrites_the_user_text_has_no_head_and_the_scan_refuses_it():
    """``| lower`` turns the probe's marker into other text: no head/tail split (``verbatim`` false, empty head), the
    end of turn still read; the scan says so in one line instead of unpacking a failed split."""
    from bkdattr.core.errors import ConfigError
    from bkdattr.scan.stage import apply_template

    tok = copy.deepcopy(tokenizer())
    tok.chat_template = TEMPLATE.replace("m['content']", "m['content'] | lower")
    assert "| lower" in tok.chat_template
    t = Template.of(tok)
    assert (t.verbatim, t.head, t.tail, t.head_ids) == (False, "", "", ())
    assert t.end_of_turn == "<|im_end|>" and t.header_ids == tuple(CHATML_HEADER)
    assert Template.of(tokenizer()).verbatim
    with pytest.raises(ConfigError, match="rewrites the user's text"):
        apply_template(tok, None)
