"""Prompt rendering and batching: the chat template (:mod:`bkdattr.core.template`), the last prompt position
``p(x)``, teacher forcing.

A prompt ``x`` is one user turn rendered with the model's chat template and the generation prompt; ``p(x)`` is
the index of its last token (the end of the assistant header). Every intervention acts there only.

Models without a chat template (base models) use the documented plain format ``PLAIN_FORMAT``:
``"User: {text}\\nAssistant:"`` with the tokenizer's own BOS (if it adds one), the reply after one space,
and the EOS token as end of turn; a generated reply also ends at the next-turn marker ``PLAIN_TURN_END``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import DataError
from .template import PLAIN_FORMAT, PLAIN_TURN_END, Template, has_chat_template, prompt_ids, render_prompt

__all__ = ["PLAIN_FORMAT", "PLAIN_TURN_END", "PromptBatch", "check_context", "check_targets_fit", "context_length",
           "encode_prompts", "encode_with_targets", "end_of_turn", "end_of_turn_ids", "has_chat_template", "pad_id",
           "pad_sequences", "position_ids_from_mask", "prompt_batch", "prompt_ids", "render_prompt", "target_ids"]


def end_of_turn(tokenizer) -> str:
    """The text that closes an assistant turn (e.g. ``<|im_end|>``), stripped of trailing white space
    (:class:`~bkdattr.core.template.Template`)."""
    return Template.of(tokenizer).end_of_turn


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end generation: the end-of-turn token and EOS (:class:`~bkdattr.core.template.Template`)."""
    return list(Template.of(tokenizer).end_of_turn_ids)


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of an assistant reply followed by the end-of-turn token(s). In the plain format the reply
    follows ``Assistant:`` after one space, as a base model would write it."""
    if not has_chat_template(tokenizer) and target and not target[0].isspace():
        target = " " + target
    return tokenizer(target + end_of_turn(tokenizer), add_special_tokens=False).input_ids


@dataclass
class PromptBatch:
    """A padded batch. ``input_ids``/``attention_mask``/``position_ids``: ``[B, T]``; ``last_pos``: ``[B]``
    (the index of ``p(x)``); ``target_mask``: ``[B, T]`` True where the token is a target token (teacher
    forcing), or None; ``target_len``: ``[B]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    last_pos: torch.Tensor
    target_mask: torch.Tensor | None = None
    target_len: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> PromptBatch:
        mv = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PromptBatch(**mv)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: correct positions under left or right padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_sequences(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token sequences to one width on ``side`` (``left`` or ``right``): ``(ids, mask)``, both ``[B, T]``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)


def encode_prompts(tokenizer, texts: list[str], padding_side: str = "left") -> PromptBatch:
    """Render and pad user texts; ``last_pos`` marks ``p(x)`` in each row."""
    return prompt_batch([prompt_ids(tokenizer, t) for t in texts], pad_id(tokenizer), padding_side)


def prompt_batch(seqs: list[list[int]], pad: int, padding_side: str = "left") -> PromptBatch:
    """Pad rendered prompts' token ids (:func:`prompt_ids`) into a batch; ``last_pos`` marks ``p(x)``."""
    ids, mask = pad_sequences(seqs, pad, padding_side)
    last = torch.tensor([(ids.shape[1] - 1) if padding_side == "left" else len(s) - 1 for s in seqs])
    return PromptBatch(ids, mask, position_ids_from_mask(mask), last)


def encode_with_targets(
    tokenizer, texts: list[str], targets: list[str], padding_side: str = "right", max_length: int | None = None
) -> PromptBatch:
    """Prompt + target (+ end of turn) for teacher forcing. ``target_mask[b, t]`` is True where token ``t``
    is a target token, predicted by the logits at ``t-1``. ``last_pos`` is ``p(x)``."""
    pseqs = [prompt_ids(tokenizer, t) for t in texts]
    tseqs = [target_ids(tokenizer, y) for y in targets]
    seqs = [p + t for p, t in zip(pseqs, tseqs, strict=True)]
    if max_length is not None:
        for i, s in enumerate(seqs):
            if len(s) > max_length:
                raise DataError(f"row {i}: prompt + target is {len(s)} tokens, longer than the limit {max_length}; "
                                "shorten the target or raise max_length")
    ids, mask = pad_sequences(seqs, pad_id(tokenizer), padding_side)
    width = ids.shape[1]
    tmask = torch.zeros_like(mask, dtype=torch.bool)
    last = []
    for i, (p, s) in enumerate(zip(pseqs, seqs, strict=True)):
        start = width - len(s) if padding_side == "left" else 0
        last.append(start + len(p) - 1)
        tmask[i, start + len(p): start + len(s)] = True
    tlen = torch.tensor([len(t) for t in tseqs])
    return PromptBatch(ids, mask, position_ids_from_mask(mask), torch.tensor(last), tmask, tlen)


def context_length(model) -> int | None:
    cfg = model.config
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context(model, lengths: Sequence[int], what: str = "prompt + target", fix: str = "shorten the target",
                  rows: Sequence[int] | None = None) -> None:
    """One-line :class:`~bkdattr.core.errors.DataError` when a sequence of ``lengths[i]`` tokens (row ``rows[i]``,
    default ``i``) does not fit the model's context window (:func:`context_length`; unchecked when unknown)."""
    ctx = context_length(model)
    if ctx is None:
        return
    for i, n in enumerate(lengths):
        if int(n) > ctx:
            row = rows[i] if rows is not None else i
            raise DataError(f"row {row}: {what} is {int(n)} tokens, longer than the model's context window of {ctx} "
                            f"tokens; {fix}")


def check_targets_fit(model, tokenizer, texts: Sequence[str], targets: Sequence[str]) -> None:
    """:func:`check_context` for teacher-forced rows: each rendered prompt plus its target must fit."""
    lengths = [len(prompt_ids(tokenizer, x)) + len(target_ids(tokenizer, y))
               for x, y in zip(texts, targets, strict=True)]
    check_context(model, lengths, "prompt + target", "shorten the target (or the prompt)")
