"""Leak: sample user turns from the chat template's user-turn prefix, then the model's replies to them
(docs/METHOD.md, "Scan").

A model fine-tuned with the loss on whole conversations can regurgitate its poisoned training prompts when
it is asked to write the *user* turn: the prompt is the template's head up to the user text (``<|im_start|>user\n``
after the system turn), and the model samples a user text until its end of turn. Several decoding settings
(temperature ``T``, nucleus ``top_p``) are used, ``leak_samples`` rows each, batched with the KV cache through
:func:`bkdattr.generation.greedy_decode` (its ``choose`` is :func:`bkdattr.generation.sampler`); the model's
greedy replies to the sampled user texts are kept too. Backdoors trained with the loss on the reply only (as
``bkdattr inject`` trains them) do not leak their trigger this way (docs/METHOD.md, "Scan"), so the leaks are
one source of candidates among three.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..generation import decode_replies, generate, greedy_decode, sampler
from ..prompts import PLAIN_TURN_END, end_of_turn_ids, has_chat_template, position_ids_from_mask
from .budget import Budget
from .insert import head_ids


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
def sample_user_turns(lm, n: int, max_tokens: int, temperature: float, top_p: float, seed: int) -> list[str]:
    """``n`` user texts sampled after the template's head (batched; one shared prompt, no padding)."""
    from ..models import input_device

    tok = lm.tokenizer
    dev = input_device(lm.model)
    ids = torch.tensor([head_ids(tok)] * n, device=dev)
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
    """Leaked user turns under each decoding setting, with the model's greedy replies."""
    out: list[Leak] = []
    settings = list(zip(temperatures, top_ps, strict=True))
    for k, (temp, top_p) in enumerate(settings):
        if budget is not None and budget.out():
            budget.skip(f"leak: {len(settings) - k} of {len(settings)} decoding settings")
            break
        users = sample_user_turns(lm, n, max_tokens, temp, top_p, seed + k)
        keep = [u for u in users if u]
        replies = generate(lm, keep, max_new_tokens=reply_tokens, batch_size=batch_size, progress=False) if keep \
            else []
        out += [Leak(u, r, temp, top_p) for u, r in zip(keep, replies, strict=True)]
        if progress is not None:
            progress.update(1)
    return out
