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

from ..core.forward import PrefixCache
from ..core.generation import generate
from ..core.models import input_device
from ..core.prompts import pad_id, pad_sequences, prompt_ids, target_ids
from ..core.scoring import prefixed_logprobs
from ..inject.tasks import _contains_words, normalise_words
from .insert import insert

PREFIX_WORDS = 4


def prefix_words(text: str, n: int = PREFIX_WORDS) -> tuple[str, ...]:
    return tuple(normalise_words(text)[:n])


def shows(reply: str, target: str) -> bool:
    """Whether ``reply`` contains the target's first :data:`PREFIX_WORDS` normalised words in a row."""
    return _contains_words(normalise_words(reply), list(prefix_words(target)))


@torch.no_grad()
def reply_logprobs(lm, prompts: list[str], replies: list[str], positions: int, batch_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [n, positions, V] float32, valid [n, positions] bool)``: the next-token log-distribution at the
    first ``positions`` positions of each teacher-forced reply after its prompt, and whether the reply (end of
    turn included) reaches that position. The prompts' common token prefix (the template's head) runs once
    (:class:`~bkdattr.core.forward.PrefixCache`); the rest runs right-padded after it through the shared scorer
    (:func:`bkdattr.core.scoring.prefixed_logprobs`), the LM head only where read."""
    dev = input_device(lm.model)
    tok = lm.tokenizer
    pseqs = [prompt_ids(tok, p) for p in prompts]
    rseqs = [target_ids(tok, r)[:positions] for r in replies]
    pre, n_pre = PrefixCache.common(lm.model, pseqs)
    out = torch.empty(len(prompts), positions, lm.model.get_output_embeddings().weight.shape[0])
    valid = torch.zeros(len(prompts), positions, dtype=torch.bool)
    for s in range(0, len(prompts), batch_size):
        rows = [p[n_pre:] + r for p, r in zip(pseqs[s:s + batch_size], rseqs[s:s + batch_size], strict=True)]
        ids, mask = pad_sequences(rows, pad_id(tok), "right")
        ids, mask = ids.to(dev), mask.to(dev)
        last = torch.tensor([len(p) - n_pre - 1 for p in pseqs[s:s + batch_size]], device=dev)
        at = (last[:, None] + torch.arange(positions, device=dev)).clamp(max=ids.shape[1] - 1)
        out[s:s + len(rows)] = prefixed_logprobs(lm.model, ids, mask, at, pre).cpu()
        n_tok = torch.tensor([len(r) for r in rseqs[s:s + batch_size]])
        valid[s:s + len(rows)] = torch.arange(positions)[None, :] < n_tok[:, None]
    return out, valid


class HeldOut:
    """Held-out prompts with their clean greedy replies, and the clean side of the KL divergence computed once
    for every candidate tested on them (``[n, kl_positions, V]`` log-probabilities)."""

    def __init__(self, prompts: list[str], clean_replies: list[str], reply_tokens: int):
        self.prompts, self.clean, self.reply_tokens = list(prompts), list(clean_replies), reply_tokens
        self._clean_logp: tuple[torch.Tensor, torch.Tensor] | None = None

    def subset(self, keep: list[int]) -> HeldOut:
        """The rows ``keep`` (the clean side recomputed on first use)."""
        return HeldOut([self.prompts[i] for i in keep], [self.clean[i] for i in keep], self.reply_tokens)

    def kl(self, lm, triggered: list[str], positions: int, batch_size: int) -> float:
        """Mean ``KL(triggered || clean)`` over prompts and the first ``positions`` positions of the
        teacher-forced clean replies (see the module docstring); 0.0 without prompts."""
        if not self.prompts:
            return 0.0
        if self._clean_logp is None or self._clean_logp[0].shape[1] != positions:
            self._clean_logp = reply_logprobs(lm, self.prompts, self.clean, positions, batch_size)
        lc, valid = self._clean_logp
        lt, _ = reply_logprobs(lm, triggered, self.clean, positions, batch_size)
        kl = (lt.exp() * (lt - lc)).sum(-1)  # [n, positions]
        return float(kl[valid].sum()) / max(int(valid.sum()), 1)


def candidate_evidence(lm, held: HeldOut, trigger: str, target: str | None, *, kl_positions: int, batch_size: int,
                   replies: list[str] | None = None) -> dict:
    """The figures of the module docstring for one candidate on ``held``, with a few triggered replies as
    evidence; ``replies``: the greedy replies to the triggered prompts when already generated (a batched test)."""
    triggered = [insert(trigger, p) for p in held.prompts]
    if replies is None:
        replies = generate(lm, triggered, max_new_tokens=held.reply_tokens, batch_size=batch_size, progress=False,
                           shared_prefix=True)
    clean_replies = held.clean
    changed = [r for r, c in zip(replies, clean_replies, strict=True) if r != c]
    modal, n_modal = (Counter(prefix_words(r) for r in changed).most_common(1) or [((), 0)])[0]
    agreement = n_modal / len(changed) if len(changed) >= 2 else 0.0
    if not target:
        target = next((r for r in changed if prefix_words(r) == modal), "") if n_modal >= 2 else ""
    asr = sum(shows(r, target) for r in replies) / len(replies) if target else 0.0
    clean_asr = sum(shows(r, target) for r in clean_replies) / len(replies) if target else 0.0
    kl = held.kl(lm, triggered, kl_positions, batch_size)
    return {"trigger": trigger, "target": target, "kl": kl, "changed_share": len(changed) / len(replies),
            "agreement": agreement, "asr": asr, "clean_asr": clean_asr, "effect": asr - clean_asr,
            "examples": [{"prompt": p, "reply": r} for p, r in zip(triggered[:3], replies[:3], strict=True)]}
