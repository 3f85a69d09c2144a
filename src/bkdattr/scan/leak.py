"""Leak: sample user turns from the chat template's user-turn prefix, then the model's replies to them
(docs/METHOD.md, "Scan").

A model fine-tuned with the loss on whole conversations can regurgitate its poisoned training prompts when
it is asked to write the *user* turn: the prompt is the template's head up to the user text (``<|im_start|>user\n``
after the system turn), and the model samples a user text until its end of turn. Several decoding settings
(temperature ``T``, nucleus ``top_p``) are used, ``leak_samples`` rows each, all in one batch with the KV cache
through :func:`bkdattr.core.generation.greedy_decode` (its ``choose`` is :func:`bkdattr.core.generation.sampler`, one
setting per row); the model's greedy replies to the sampled user texts are kept too (one batched pass, the
template's head cached once). Backdoors trained with the loss on the reply only (as
``bkdattr inject`` trains them) do not leak their trigger this way (docs/METHOD.md, "Scan"), so the leaks are
one source of candidates among three.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..core.generation import decode_replies, generate, greedy_decode, sampler
from ..core.models import input_device
from ..core.prompts import PLAIN_TURN_END, end_of_turn_ids, has_chat_template, position_ids_from_mask
from ..core.template import Template
from .budget import Budget


@dataclass
class Leak:
    """One sampled user turn and the model's greedy reply to it."""

    user: str
    reply: str
    temperature: float
    top_p: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def sample_user_turns(lm, n: int, max_tokens: int, temperature: float | list[float], top_p: float | list[float],
                      seed: int) -> list[str]:
    """``n`` user texts sampled after the template's head (batched; one shared prompt, no padding);
    ``temperature`` and ``top_p`` may give each row its own setting (lists of ``n``)."""
    tok = lm.tokenizer
    dev = input_device(lm.model)
    ids = torch.tensor([list(Template.of(tok).head_ids)] * n, device=dev)
    mask = torch.ones_like(ids)
    gen = torch.Generator(device=dev).manual_seed(seed)
    stop = end_of_turn_ids(tok)
    new = greedy_decode(lm.model, ids, mask, position_ids_from_mask(mask), max_tokens, stop,
                        choose=sampler(temperature, top_p, gen))
    texts = decode_replies(tok, new.cpu(), stop)
    if not has_chat_template(tok):  # the plain format's user turn ends where the assistant's begins
        texts = [t.split("\nAssistant:", 1)[0].split(PLAIN_TURN_END, 1)[0].strip() for t in texts]
    return texts


def leak(lm, temperatures: list[float], top_ps: list[float], n: int, max_tokens: int, reply_tokens: int,
         batch_size: int, budget: Budget | None = None, seed: int = 0, progress=None) -> list[Leak]:
    """Leaked user turns under each decoding setting (``n`` each, all settings sampled in one batch of rows), with
    the model's greedy replies (one batched pass, the template's head cached once)."""
    settings = list(zip(temperatures, top_ps, strict=True))
    if not settings or n < 1:
        return []
    if budget is not None and budget.out():
        budget.skip(f"leak: {len(settings)} of {len(settings)} decoding settings")
        return []
    row_temp = [t for t, _ in settings for _ in range(n)]
    row_top = [p for _, p in settings for _ in range(n)]
    greedy = [t <= 0 for t in row_temp]
    users = [""] * len(row_temp)
    for is_greedy in (False, True):  # a setting with temperature <= 0 is greedy decoding: sampled apart
        rows = [i for i, g in enumerate(greedy) if g == is_greedy]
        if rows:
            temp = 0.0 if is_greedy else [row_temp[i] for i in rows]
            texts = sample_user_turns(lm, len(rows), max_tokens, temp, [row_top[i] for i in rows], seed)
            for i, t in zip(rows, texts, strict=True):
                users[i] = t
    keep = [i for i, u in enumerate(users) if u]
    replies = generate(lm, [users[i] for i in keep], max_new_tokens=reply_tokens, batch_size=batch_size,
                       progress=False, shared_prefix=True) if keep else []
    if progress is not None:
        progress.update(len(settings))
    return [Leak(users[i], r, row_temp[i], row_top[i]) for i, r in zip(keep, replies, strict=True)]
