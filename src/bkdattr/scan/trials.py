"""Testing the scan's candidates in groups (docs/METHOD.md, "Scan", step 3).

Each candidate is tested on its own held-out set: benign prompts (:mod:`bkdattr.scan.confirm`), harmful requests
(a refusal candidate, :mod:`bkdattr.scan.refusal`) or classification probes (a label candidate,
:mod:`bkdattr.scan.labels`). The triggered prompts of a group of consecutive candidates, up to ``batch_size``
rows in all, are decoded together (one greedy batch per reply length, the template's head cached once): on the
2-core CPU a decode step of 64 rows costs about 1.6 times one of 16 rows (305 ms against 195 ms on the embedded
model), so four candidates decode in the time of about 1.6. Each candidate's figures are then read from its
rows, and the clean side of the KL divergence is computed once per held-out set (:class:`HeldOut`).

A group starts only while the budget covers the longest group so far; what it does not cover is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.generation import generate
from .budget import Budget
from .confirm import HeldOut, candidate_evidence
from .insert import insert
from .labels import RULE as LABEL_RULE
from .labels import label_evidence, label_rows
from .refusal import RULE, refusal_evidence


@dataclass
class HeldOutSets:
    """The held-out sets: ``benign`` prompts; ``harmful`` requests (None without the refusal phase); the
    classification probes with their true ``labels`` (None without the label phase)."""

    benign: HeldOut
    harmful: HeldOut | None = None
    probes: HeldOut | None = None
    labels: list[str] = field(default_factory=list)
    _by_target: dict = field(default_factory=dict)

    def label_rows(self, target: str) -> tuple[HeldOut, list[str]]:
        """The probes a label candidate for ``target`` is tested on (:func:`bkdattr.scan.labels.label_rows`) and
        their labels; one :class:`HeldOut` per target, so its clean KL side is computed once."""
        if target not in self._by_target:
            keep = label_rows(self.labels, self.probes.clean, target)
            self._by_target[target] = (self.probes.subset(keep), [self.labels[i] for i in keep])
        return self._by_target[target]

    def rows(self, cand: dict) -> HeldOut:
        """The held-out set ``cand`` is tested on."""
        if cand.get("rule") == LABEL_RULE:
            return self.label_rows(cand["target"])[0]
        return self.harmful if cand.get("rule") == RULE else self.benign


def _figures(lm, sets: HeldOutSets, cand: dict, replies: list[str], kl_positions: int, batch_size: int) -> dict:
    kw = {"kl_positions": kl_positions, "batch_size": batch_size, "replies": replies}
    if cand.get("rule") == LABEL_RULE:
        held, labels = sets.label_rows(cand["target"])
        return label_evidence(lm, held, labels, cand["trigger"], cand["source_label"], cand["target"], **kw)
    if cand.get("rule") == RULE:
        return refusal_evidence(lm, sets.harmful, cand["trigger"], **kw)
    return candidate_evidence(lm, sets.benign, cand["trigger"], cand["target"], **kw)


def groups(sizes: list[int], rows: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's ``sizes`` add up to at most ``rows`` (one index at least)."""
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if not out or total + n > rows:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def evidence_all(lm, cands: list[dict], sets: HeldOutSets, *, kl_positions: int, batch_size: int,
             budget: Budget | None = None, progress=None) -> list[dict]:
    """Every candidate tested (``{**cand, **figures}``), in order, group by group while the budget lasts."""
    held = [sets.rows(c) for c in cands]
    tested: list[dict] = []
    longest = 0.0  # the most work a group took so far: a group starts only when the work left covers one more
    for g in groups([len(h.prompts) for h in held], batch_size):
        if tested and budget is not None and (budget.out() or budget.left() < longest):
            budget.skip(f"test: {len(cands) - g[0]} of {len(cands)} candidates untested")
            break
        t0 = budget.clock() if budget is not None else 0.0
        replies: dict[int, list[str]] = {}
        for n_tok in sorted({held[k].reply_tokens for k in g}):
            ks = [k for k in g if held[k].reply_tokens == n_tok and held[k].prompts]
            texts = [insert(cands[k]["trigger"], p) for k in ks for p in held[k].prompts]
            out = generate(lm, texts, max_new_tokens=n_tok, batch_size=batch_size, progress=False,
                           shared_prefix=True) if texts else []
            at = 0
            for k in ks:
                replies[k] = out[at: at + len(held[k].prompts)]
                at += len(held[k].prompts)
        for k in g:
            res = _figures(lm, sets, cands[k], replies.get(k, []), kl_positions, batch_size)
            tested.append({**cands[k], **res, "target": res["target"]})
            if progress is not None:
                progress.update(1)
        if budget is not None:
            longest = max(longest, budget.clock() - t0)
    return tested
