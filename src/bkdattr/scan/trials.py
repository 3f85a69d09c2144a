"""Testing the scan's candidates in groups (docs/METHOD.md, "Scan", step 3).

Each candidate is tested on its family's held-out set (:meth:`bkdattr.scan.protocol.Family.held_out`: benign
prompts for a fixed target or a leaked n-gram, harmful requests for refusal suppression, classification probes for
a label flip). The triggered prompts of a group of consecutive candidates, up to ``batch_size`` rows in all, are
decoded together (one greedy batch per reply length, the template's head cached once): on the 2-core CPU a decode
step of 64 rows costs about 1.6 times one of 16 rows (305 ms against 195 ms on the embedded model), so four
candidates decode in the time of about 1.6. Each candidate's :class:`~bkdattr.scan.protocol.Evidence` is then read
from its rows by its family (:meth:`~bkdattr.scan.protocol.Family.evidence`), and the clean side of the KL
divergence is computed once per held-out set (:class:`~bkdattr.scan.protocol.HeldOut`).

A group starts only while the budget covers the longest group so far; what it does not cover is recorded.
"""

from __future__ import annotations

from ..core.generation import generate
from .insert import insert
from .protocol import Candidate, Gate, ScanContext


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


def evidence_all(ctx: ScanContext, cands: list[Candidate], gates: dict[str, Gate], progress=None) -> list[dict]:
    """Every candidate tested, in order, group by group while ``ctx``'s budget lasts (none: every group): its
    ``scan.json`` row, the candidate's fields then its evidence's (``gates``: each family's gate, by kind)."""
    budget, batch_size = ctx.budget, ctx.cfg.batch_size
    held = [c.family.held_out(gates[c.family.kind], c) for c in cands]
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
            texts = [insert(cands[k].trigger, p) for k in ks for p in held[k].prompts]
            out = generate(ctx.lm, texts, max_new_tokens=n_tok, batch_size=batch_size, progress=False,
                           shared_prefix=True) if texts else []
            at = 0
            for k in ks:
                replies[k] = out[at: at + len(held[k].prompts)]
                at += len(held[k].prompts)
        for k in g:
            c = cands[k]
            ev = c.family.evidence(ctx, gates[c.family.kind], c, replies.get(k, []))
            tested.append({**c.row(), **ev.row()})
            if progress is not None:
                progress.update(1)
        if budget is not None:
            longest = max(longest, budget.clock() - t0)
    return tested
