"""Trigger search for a target: gradient-ranked token candidates, exact tests, a small beam (docs/METHOD.md,
"Scan").

For a target ``y`` the search looks for a short token sequence ``t`` (at most ``trigger_tokens``) that, as a
prefix of benign prompts, maximises ``s(t)`` (:class:`~bkdattr.scan.insert.TargetScorer`: the prompt-averaged
mean log-probability of ``y``'s first tokens). Each step, for every trigger in the beam:

1. one forward and backward pass give ``g_k = d s / d onehot_k`` for every slot ``k`` (and a slot appended
   at the end while ``t`` is shorter than the limit); the ``search_topk`` tokens with the largest ``g_k``
   (allowed tokens only: printable, not special) are that slot's proposals -- the first-order gain of
   swapping the slot's token for each vocabulary item, over the whole vocabulary at once;
2. candidates: the appended slot's best proposals (extensions), and single-slot substitutions drawn at
   random from the other slots' proposals (seeded);
3. every candidate is scored exactly (``search_candidates`` per step in all), and the ``search_beam`` best
   of the beam and the candidates form the next beam.

The search stops after ``search_steps``, when its share of the budget ends, or once the best ``s(t)`` reaches
its objective's stop score (``stop_score``, log 0.9: the target already follows with probability ~0.9 per token).

:func:`run_searches` is the scan's search schedule: the objectives of every family, heaviest first, each on its
share of the work up to the phase's end in proportion to the objectives' weights (what one leaves goes to the
next); the ``triggers_per_search`` best triggers of each become candidates.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from .budget import Budget
from .insert import TargetScorer
from .protocol import Candidate, Objective, ScanContext


@dataclass
class Found:
    """A searched trigger: token ids, text and ``s(t)``."""

    ids: list[int]
    text: str
    score: float


def allowed_tokens(tokenizer) -> torch.Tensor:
    """``[V]`` bool: tokens a trigger may use -- printable ASCII text with a letter, digit or punctuation mark,
    not a special token."""
    special = set(tokenizer.all_special_ids)
    out = torch.zeros(len(tokenizer), dtype=torch.bool)
    for i in range(len(tokenizer)):
        if i in special:
            continue
        s = tokenizer.decode([i])
        out[i] = bool(s.strip()) and s.isascii() and s.isprintable()
    return out


def without_words(tokenizer, allowed: torch.Tensor, text: str) -> torch.Tensor:
    """``allowed`` ``[V]`` less the tokens whose text contains a word (3+ letters) of ``text``, any case: a prefix
    that names a label instructs the model to answer it, which any instruction-following classifier obeys."""
    words = [w.lower() for w in re.findall(r"[A-Za-z]{3,}", text)]
    out = allowed.clone()
    for i in torch.nonzero(allowed).flatten().tolist():
        piece = tokenizer.decode([i]).lower()
        if any(w in piece for w in words):
            out[i] = False
    return out


def search_trigger(scorer: TargetScorer, allowed: torch.Tensor, tokenizer, *, max_tokens: int, topk: int,
                   n_candidates: int, beam: int, steps: int, stop_score: float, budget: Budget | None = None,
                   seed: int = 0, progress=None, label: str = "") -> list[Found]:
    """Best triggers found for ``scorer``'s target, best first (see the module docstring); the search stops
    early once the best score reaches ``stop_score``. A search the budget stops before its ``steps`` is recorded
    in the budget's ``not_covered`` (``search: LABEL stopped by the budget``)."""
    rng = random.Random(seed)
    allowed = allowed.to(torch.bool)
    base = float(scorer.scores([[]])[0])
    pool: dict[tuple[int, ...], float] = {(): base}
    current = [()]
    for _ in range(steps):
        if budget is not None and budget.out():
            budget.skip(f"search: {label} stopped by the budget")
            break
        cands: list[tuple[int, ...]] = []
        per = max(1, n_candidates // max(1, len(current)))
        for trig in current:
            append = len(trig) < max_tokens
            _, grad = scorer.gradient(list(trig), append)
            grad = grad.masked_fill(~allowed[None, :grad.shape[1]], float("-inf"))
            top = grad.topk(min(topk, int(allowed.sum())), dim=1).indices.tolist()
            mine: list[tuple[int, ...]] = []
            n_ext = per if not trig else (per + 1) // 2
            if append:
                mine += [trig + (tok,) for tok in top[-1][:n_ext]]
            subs = len(trig)
            tries = 0
            while subs and len(mine) < per and tries < 4 * per:
                tries += 1
                k = rng.randrange(subs)
                new = list(trig)
                new[k] = rng.choice(top[k])
                mine.append(tuple(new))
            cands += [c for c in mine if c not in pool and c not in cands]
        if not cands:
            break
        vals = scorer.scores([list(c) for c in cands]).tolist()
        pool.update(zip(cands, vals, strict=True))
        current = [c for c, _ in sorted(pool.items(), key=lambda kv: -kv[1]) if c][:beam]
        if progress is not None:
            progress.update(1)
        if pool[current[0]] >= stop_score:
            break
    ranked = sorted(((c, v) for c, v in pool.items() if c), key=lambda kv: -kv[1])
    return [Found(list(c), tokenizer.decode(list(c)).strip(), v) for c, v in ranked[:max(beam, 3)]]


def run_searches(ctx: ScanContext, objectives: list[Objective], *, end: float, seed: int, progress=None
                 ) -> list[Candidate]:
    """The schedule of the module docstring: ``objectives`` heaviest first (stable), the ``i``-th with seed
    ``seed + i``, each until its steps, its stop score or its share of the work left before ``end`` (budget clock
    units); the searches the budget does not reach are recorded in its ``not_covered``."""
    lm, cfg, budget = ctx.lm, ctx.cfg, ctx.budget
    tok = lm.tokenizer
    objectives = sorted(objectives, key=lambda o: -o.weight)
    allowed: torch.Tensor | None = None
    found: list[Candidate] = []
    for i, o in enumerate(objectives):
        left = end - budget.clock()
        if left <= 0 or budget.wall_out():
            names = ", ".join(j.name for j in objectives[i:])
            budget.skip(f"search: {len(objectives) - i} of {len(objectives)} searches not run ({names})")
            break
        weights = [max(j.weight, 1e-3) for j in objectives[i:]]  # the search work left, in proportion to the weights
        budget.phase_deadline = budget.clock() + left * weights[0] / sum(weights)
        allowed = allowed_tokens(tok) if allowed is None else allowed
        scorer = TargetScorer(lm, o.prompts, o.target_ids, cfg.score_tokens, cfg.batch_size, sign=o.sign)
        res = search_trigger(scorer, without_words(tok, allowed, o.avoid) if o.avoid else allowed, tok,
                             max_tokens=cfg.trigger_tokens, topk=cfg.search_topk, n_candidates=cfg.search_candidates,
                             beam=cfg.search_beam, steps=cfg.search_steps, stop_score=o.stop, budget=budget,
                             seed=seed + i, progress=progress, label=o.name)
        found += [Candidate(f.text, o.family, "search", o, search_score=f.score)
                  for f in res[:cfg.triggers_per_search]]
    return found
