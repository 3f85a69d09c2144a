"""One chat-template object per tokenizer: how a user turn is rendered, where the prompt ends and the reply stops.

A prompt ``x`` is one user turn rendered with the model's chat template and the generation prompt (or, for a model
without one, the documented plain format :data:`PLAIN_FORMAT`). :meth:`Template.of` probes the tokenizer once
and keeps:

* ``head`` / ``tail``: the rendered prompt's text before and after the user text (the template rendered around a
  marker; empty, with ``verbatim`` false, for a template that rewrites the user text); ``head_ids``: the head's
  token ids (BOS included where the plain format adds one). The scan runs the head once as a prefix KV cache and
  places triggers right after it.
* ``header_ids``: the token ids every rendered prompt ends with (the assistant header, or the plain format's
  ``Assistant:``): the common suffix of four rendered prompts with different endings. :meth:`prompt_positions`
  finds ``p(x)`` with it in any row, prompt + reply included (the guard's hooks).
* ``end_of_turn``: the text that closes an assistant turn (``<|im_end|>``; the template rendered with a marker
  as the assistant's content, stripped of trailing white space; EOS when the template has none or refuses the
  probe); ``end_of_turn_ids``: the ids that end generation (that text when it is one token, and EOS).

The head is cut at the user text and tokenised alone, the header is read off whole rendered prompts: two
algorithms on purpose, since the head's ids are what the scan runs as its prefix cache while the header's are what a
rendered prompt actually ends with (the user text can merge with the tokens around it, so one algorithm for both
would move BPE boundaries and with them ``p(x)`` or the scan's segments; ``tests/test_template.py`` pins the ids).
The object is cached per tokenizer and rebuilt when the tokenizer's chat template or special tokens change (the
scan sets ``chat_template`` after loading).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jinja2 import TemplateError

PLAIN_FORMAT = "User: {text}\nAssistant:"
#: where a plain-format reply ends: a base model's greedy reply runs on into an invented next user turn
PLAIN_TURN_END = "\nUser:"
_USER_MARK = "\u2063BKDATTR_USER\u2063"
_REPLY_MARK = "\u2063BKDATTR_REPLY\u2063"
#: user texts with different endings whose rendered prompts share only the template's assistant header
_HEADER_PROBES = ("a", "Why?", "x y z 1", "Done.\n")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, text: str) -> str:
    """Render one user turn with the generation prompt (chat template, or ``PLAIN_FORMAT``)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_FORMAT.format(text=text)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one rendered prompt (the plain format with the tokenizer's own special tokens)."""
    return tokenizer(render_prompt(tokenizer, text), add_special_tokens=not has_chat_template(tokenizer)).input_ids


def _end_of_turn(tokenizer) -> str:
    if has_chat_template(tokenizer):
        try:
            full = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY_MARK}], tokenize=False
            )
        except (TemplateError, ValueError, TypeError):  # a template that refuses this probe: fall back to EOS
            full = ""
        if _REPLY_MARK in full:
            tail = full.split(_REPLY_MARK, 1)[1].rstrip()
            if tail:
                return tail
    return tokenizer.eos_token or ""


def _common_suffix(seqs: Sequence[Sequence[int]]) -> list[int]:
    n = 0
    while n < min(len(s) for s in seqs) - 1 and len({s[-1 - n] for s in seqs}) == 1:
        n += 1
    return list(seqs[0][len(seqs[0]) - n:])


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended column per row: ``[B]``."""
    t = mask.shape[1]
    return t - 1 - mask.flip(1).long().argmax(1)


def prompt_positions(header: Sequence[int], input_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """``p(x)`` per row of a forward call (``input_ids``/``mask`` ``[B, T]``): the last column when every row
    ends with the assistant ``header`` (left-padded prompts), else the end of the last occurrence of ``header``
    in the row (prompt + reply, any padding), else the row's last attended column. ``[B]`` long."""
    last = _last_real(mask)
    n = len(header)
    if input_ids is None or n == 0 or input_ids.shape[1] < n:
        return last
    head = torch.tensor(list(header), device=input_ids.device)
    if bool(mask[:, -1].all()) and bool((input_ids[:, -n:] == head).all()):
        return torch.full_like(last, input_ids.shape[1] - 1)
    win = input_ids.unfold(1, n, 1)  # [B, T-n+1, n]
    hit = (win == head).all(-1) & mask[:, n - 1:].bool()  # hit[b, j]: the header ends at column j + n - 1
    ends = torch.arange(hit.shape[1], device=hit.device) + n - 1
    found = torch.where(hit, ends, torch.full_like(ends, -1)).max(1).values
    return torch.where(found >= 0, found, last)


@dataclass(frozen=True)
class Template:
    """The chat template of one tokenizer (see the module docstring); build it with :meth:`of`."""

    chat: bool
    head: str
    tail: str
    head_ids: tuple[int, ...]
    header_ids: tuple[int, ...]
    end_of_turn: str
    end_of_turn_ids: tuple[int, ...]
    #: whether the template renders the user text verbatim (a template that rewrites it, e.g. with ``| lower``,
    #: has no head/tail split: ``head``, ``tail`` and ``head_ids`` are then empty)
    verbatim: bool = True

    @classmethod
    def of(cls, tokenizer) -> Template:
        """The tokenizer's template, probed once and cached until its chat template or special tokens change."""
        key = (repr(getattr(tokenizer, "chat_template", None)), tokenizer.eos_token, tokenizer.bos_token)
        try:
            got = _CACHE.get(tokenizer)
        except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: probe every time
            return cls.probe(tokenizer)
        if got is None or got[0] != key:
            got = (key, cls.probe(tokenizer))
            _CACHE[tokenizer] = got
        return got[1]

    @classmethod
    def probe(cls, tokenizer) -> Template:
        """The fields of the module docstring, probed from ``tokenizer`` now (no cache)."""
        chat = has_chat_template(tokenizer)
        head, mark, tail = render_prompt(tokenizer, _USER_MARK).partition(_USER_MARK)
        if not mark:
            head = tail = ""
        eot = _end_of_turn(tokenizer)
        stops: set[int] = set()
        if eot:
            toks = tokenizer(eot, add_special_tokens=False).input_ids
            if len(toks) == 1:
                stops.add(toks[0])
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
        return cls(chat=chat, head=head, tail=tail, verbatim=bool(mark),
                   head_ids=tuple(tokenizer(head, add_special_tokens=not chat).input_ids) if mark else (),
                   header_ids=tuple(_common_suffix([prompt_ids(tokenizer, t) for t in _HEADER_PROBES])),
                   end_of_turn=eot, end_of_turn_ids=tuple(sorted(stops)))

    def prompt_positions(self, input_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """``p(x)`` per row of a forward call's columns: ``[B]`` (:func:`prompt_positions` with this header)."""
        return prompt_positions(self.header_ids, input_ids, mask)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
