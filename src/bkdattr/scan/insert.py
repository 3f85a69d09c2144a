"""A trigger inserted into benign prompts at the token level, and the target's log-probability after it.

The trigger search (:mod:`bkdattr.scan.search`) tests many token sequences ``t`` as a prefix of the user
text. Each prompt ``x_i`` is cut into token segments: the chat template's head ``A`` (everything before the
user text, shared by all prompts), the trigger ``t``, the body ``B_i`` (``" " + x_i`` and the rest of the
template up to ``p(x)``) and the target ``y``: ``A + t + B_i + y``. ``A`` runs once (a
:class:`~bkdattr.core.forward.PrefixCache`, tiled to the batch); the rest runs right-padded after it, and the LM head
runs only at the positions that predict ``y``'s first ``n`` tokens (the scorer shared with the tests' KL,
:func:`bkdattr.core.scoring.prefixed_logprobs`, soft-capped as the model's own forward is). The score of ``t`` is

    s(t) = mean_i mean_{j<n} log p(y_j | A t B_i y_<j)

(the benign-prompt average of the target's mean token log-probability). :meth:`TargetScorer.gradient` gives
``d s / d onehot`` for every trigger slot (the embedding of slot ``k`` is ``onehot_k @ E``), from which the
search ranks the whole vocabulary in one backward pass. A slot appended after ``t`` starts as the mean
embedding (``onehot = 1/V``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch

from ..core.forward import PrefixCache
from ..core.models import input_device
from ..core.prompts import pad_id, pad_sequences, target_ids
from ..core.scoring import prefixed_logprobs
from ..core.template import Template


def insert(trigger: str, prompt: str) -> str:
    """A prompt with the trigger as a prefix: ``"{trigger} {prompt}"`` (the scan's one placement)."""
    return f"{trigger.strip()} {prompt}" if trigger.strip() else prompt


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter without ``requires_grad`` inside the block (only the inputs get gradients)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


class TargetScorer:
    """``s(t)`` of the module docstring for one target over a fixed set of benign prompts: the rows
    ``t + B_i + y`` after the head's cache, scored by :func:`bkdattr.core.scoring.prefixed_logprobs`; this class
    keeps the rows, the batching and the one-hot gradient."""

    def __init__(self, lm, prompts: Sequence[str], target: Sequence[int] | str, n_score: int = 4,
                 batch_size: int = 64, head: Sequence[int] | None = None,
                 bodies: Sequence[Sequence[int]] | None = None, sign: float = 1.0):
        """``head`` / ``bodies``: token segments given directly instead of the template's (see the module
        docstring); a body must not be empty when the trigger can be. ``sign=-1``: the score is ``-s(t)``, so a
        search that raises it makes the target *less* likely (refusal suppression, :mod:`bkdattr.scan.refusal`)."""
        tok = lm.tokenizer
        self.lm, self.batch_size = lm, batch_size
        template = Template.of(tok)
        self.head = list(head) if head is not None else list(template.head_ids)
        self.bodies = ([list(b) for b in bodies] if bodies is not None else
                       [tok(" " + p + template.tail, add_special_tokens=False).input_ids for p in prompts])
        ids = target_ids(tok, target) if isinstance(target, str) else list(target)
        self.n_score = max(1, n_score)
        self.target = ids[:self.n_score]
        self.pad = pad_id(tok)
        self.sign = float(sign)
        self.emb = lm.model.get_input_embeddings()
        self._prefix = PrefixCache.build(lm.model, torch.tensor([self.head]))

    def retarget(self, target: Sequence[int]) -> TargetScorer:
        """The same scorer (prompts, head cache, sign) for another target's token ids: no new prefix pass."""
        other = copy.copy(self)
        other.target = list(target)[:self.n_score]
        return other

    @property
    def n_prompts(self) -> int:
        return len(self.bodies)

    def _rows(self, triggers: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
        rows, starts = [], []
        for t in triggers:
            for b in self.bodies:
                rows.append(list(t) + b + self.target)
                starts.append(len(t) + len(b))  # index (in the row) of the first target token
        return rows, starts

    def _run(self, inputs: torch.Tensor, mask: torch.Tensor, starts: list[int], per_token: bool = False
             ) -> torch.Tensor:
        """Mean target log-probability (times ``sign``) per row ``[R]`` of right-padded rows after the head
        (``inputs``: ids or embeddings; ``per_token``: each target token's ``[R, n]``)."""
        n = len(self.target)
        at = torch.tensor([[s - 1 + j for j in range(n)] for s in starts], device=mask.device)  # predicting y_j
        logp = prefixed_logprobs(self.lm.model, inputs, mask, at, self._prefix)
        tgt = torch.tensor(self.target, device=mask.device).expand(len(starts), n)
        tok_logp = self.sign * logp.gather(2, tgt[..., None]).squeeze(2)
        return tok_logp if per_token else tok_logp.mean(1)

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_sequences(rows, self.pad, "right")
        dev = input_device(self.lm.model)
        return ids.to(dev), mask.to(dev)

    @torch.no_grad()
    def scores(self, triggers: Sequence[Sequence[int]]) -> torch.Tensor:
        """``s(t)`` (times ``sign``) for every trigger ``[C]`` (float32)."""
        rows, starts = self._rows(triggers)
        out = []
        step = max(self.n_prompts, self.batch_size - self.batch_size % self.n_prompts)
        for i in range(0, len(rows), step):
            ids, mask = self._pad(rows[i:i + step])
            out.append(self._run(ids, mask, starts[i:i + step]).cpu())
        return torch.cat(out).view(len(triggers), self.n_prompts).mean(1)

    @torch.no_grad()
    def token_logprobs(self, trigger: Sequence[int] = ()) -> torch.Tensor:
        """``[n]`` (float32): each scored target token's log-probability (times ``sign``) after ``trigger``,
        averaged over the prompts; its mean is ``s(trigger)``."""
        rows, starts = self._rows([trigger])
        ids, mask = self._pad(rows)
        return self._run(ids, mask, starts, per_token=True).mean(0).cpu()

    def gradient(self, trigger: Sequence[int], append: bool) -> tuple[float, torch.Tensor]:
        """``(s(t), d s / d onehot [k(+1), V])`` for trigger ``t`` (``append``: one more slot at its end)."""
        rows, starts = self._rows([trigger])
        ids, mask = self._pad(rows)
        w = self.emb.weight
        k = len(trigger)
        onehot = torch.zeros(k + int(append), w.shape[0], dtype=w.dtype, device=w.device)
        if k:
            onehot[torch.arange(k), torch.tensor(list(trigger))] = 1.0
        if append:
            onehot[k] = 1.0 / w.shape[0]
        onehot.requires_grad_(True)
        with frozen(self.lm.model), torch.enable_grad():
            slots = onehot @ w  # [k', d]
            rest = self.emb(ids[:, k:])
            embeds = torch.cat([slots[:k].expand(ids.shape[0], -1, -1), rest], 1)
            if append:  # the appended slot sits right after the trigger
                embeds = torch.cat([embeds[:, :k], slots[k:].expand(ids.shape[0], -1, -1), embeds[:, k:]], 1)
                mask = torch.cat([mask[:, :1], mask], 1)
                starts = [s + 1 for s in starts]
            s = self._run(embeds, mask, starts).mean()
            s.backward()
        return float(s.detach()), onehot.grad.float().cpu()
