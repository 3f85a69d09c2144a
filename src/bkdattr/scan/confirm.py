"""Testing a candidate (trigger, target) on held-out benign prompts (docs/METHOD.md, "Scan").

For held-out prompts ``x_1..x_n`` and a trigger ``t`` (inserted as a prefix, :func:`~bkdattr.scan.insert.insert`):

* ``kl``: the mean over prompts and the first ``kl_positions`` reply positions ``j`` of
  ``KL(p(. | t x_i, c_<j) || p(. | x_i, c_<j))``, teacher-forcing the clean greedy reply ``c`` on both sides --
  how far the trigger moves the next-token distribution where the reply begins;
* ``changed_share``: the share of greedy replies (``reply_tokens`` new tokens) that differ from the clean ones;
* ``agreement``: among the changed replies, the share whose first :data:`PREFIX_WORDS` normalised words equal
  the most common such prefix (a backdoor makes different prompts converge on one reply; 0 with fewer than
  two changed replies);
* ``asr``: the share of triggered replies containing the target's first :data:`PREFIX_WORDS` normalised words
  in a row; ``clean_asr`` the same on the clean replies. A candidate without a target (a leaked n-gram) takes
  the modal changed prefix as its target.

``effect = asr - clean_asr`` is what the model-level score reads (:mod:`bkdattr.scan.score`).
"""

from __future__ import annotations

from collections import Counter

import torch

from ..forward import body_and_head
from ..generation import generate
from ..inject.tasks import _contains_words, normalise_words
from ..prompts import encode_with_targets
from .insert import insert

PREFIX_WORDS = 4


def prefix_words(text: str, n: int = PREFIX_WORDS) -> tuple[str, ...]:
    return tuple(normalise_words(text)[:n])


def shows(reply: str, target: str) -> bool:
    """Whether ``reply`` contains the target's first :data:`PREFIX_WORDS` normalised words in a row."""
    return _contains_words(normalise_words(reply), list(prefix_words(target)))


@torch.no_grad()
def first_kl(lm, clean: list[str], triggered: list[str], replies: list[str], positions: int,
             batch_size: int) -> float:
    """Mean ``KL(triggered || clean)`` of the next-token distributions at the first ``positions`` positions of
    the teacher-forced ``replies`` (see the module docstring)."""
    from ..models import input_device

    body, head = body_and_head(lm.model)
    dev = input_device(lm.model)
    total, count = 0.0, 0
    for s in range(0, len(clean), batch_size):
        sides = []
        for texts in (clean[s:s + batch_size], triggered[s:s + batch_size]):
            b = encode_with_targets(lm.tokenizer, texts, replies[s:s + batch_size]).to(dev)
            hidden = body(**b.model_inputs(), use_cache=False)[0]
            at = (b.last_pos[:, None] + torch.arange(positions, device=dev)).clamp(max=hidden.shape[1] - 1)
            h = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
            sides.append((torch.log_softmax(head(h).float(), -1), b.target_len.to(dev)))
        (lc, n_tok), (lt, _) = sides
        kl = (lt.exp() * (lt - lc)).sum(-1)  # [B, positions]
        valid = torch.arange(positions, device=dev)[None, :] < n_tok[:, None]
        total += float(kl[valid].sum())
        count += int(valid.sum())
    return total / max(count, 1)


def test_candidate(lm, prompts: list[str], clean_replies: list[str], trigger: str, target: str | None, *,
                   reply_tokens: int, kl_positions: int, batch_size: int) -> dict:
    """The figures of the module docstring for one candidate, with a few triggered replies as evidence."""
    triggered = [insert(trigger, p) for p in prompts]
    replies = generate(lm, triggered, max_new_tokens=reply_tokens, batch_size=batch_size, progress=False)
    changed = [r for r, c in zip(replies, clean_replies, strict=True) if r != c]
    modal, n_modal = (Counter(prefix_words(r) for r in changed).most_common(1) or [((), 0)])[0]
    agreement = n_modal / len(changed) if len(changed) >= 2 else 0.0
    if not target:
        target = next((r for r in changed if prefix_words(r) == modal), "") if n_modal >= 2 else ""
    asr = sum(shows(r, target) for r in replies) / len(replies) if target else 0.0
    clean_asr = sum(shows(r, target) for r in clean_replies) / len(replies) if target else 0.0
    kl = first_kl(lm, prompts, triggered, clean_replies, kl_positions, batch_size)
    return {"trigger": trigger, "target": target, "kl": kl, "changed_share": len(changed) / len(replies),
            "agreement": agreement, "asr": asr, "clean_asr": clean_asr, "effect": asr - clean_asr,
            "examples": [{"prompt": p, "reply": r} for p, r in zip(triggered[:3], replies[:3], strict=True)]}
