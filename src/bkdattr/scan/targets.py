"""Target inversion after BAIT (Shen et al., 2025): the reply a model gives whatever the benign prompt, once its
first token is forced (docs/METHOD.md, "Scan").

A backdoor trained to produce a fixed reply ``y`` leaves ``y`` primed on clean prompts: once ``y_1`` is there,
``y_2, y_3, ...`` follow with high probability on *every* prompt, while a normal reply depends on the prompt.
On ``n`` benign prompts the inversion

1. takes the ``first_tokens`` likeliest first reply tokens (mean probability over the prompts; end-of-turn and
   special tokens excluded) and forces each;
2. extends every sequence as a beam search that branches: at each step each beam tries its ``branch`` next
   tokens with the highest mean probability over the prompts, and the ``beams_per_first`` best children of each
   forced first token are kept (greedy decoding leaves the target's path after one token: forcing "I" on the
   demo's fixed_output model decodes "I am thrilled ...", never "I am sorry ...");
3. scores a sequence ``y`` by how uniformly it follows across prompts, token by token (BAIT's Q-score with a
   minimum over tokens),

       Q(y) = mean_i min_{2<=j<=|y|} p(y_j | x_i, y_<j)

   (the first token is forced, so it is not scored). The minimum over tokens matters: with the mean, a sequence
   that reaches a fixed phrase on one prompt ('"Romeo and Juliet" is a' after '"') scores high because the
   phrase's later tokens are near-certain everywhere; with the minimum, its unlikely second token ("Rome" on
   every other prompt) sinks it. A sequence ends at an end-of-turn token. ``q_mean`` (the mean instead of the
   minimum, BAIT's own form) is kept beside it.

**Round 2.** The likeliest first tokens can miss the target's: a backdoored model whose clean replies were
trained hard gives the target's first token "I" a probability below 0.01 on benign prompts, while "I am sorry. I
can not help with that." follows it with probability ~0.99 at every token (the demo's fixed_output model). The
primed target shows up *inside* other beams instead ("Bonjour! I am sorry. I"), so a second round forces the
word-start tokens found after the first position of round 1's best targets (as a reply would begin them: "I"
for " I"), up to ``first_tokens`` new ones.

**Round 0, the vocabulary sweep** (BAIT forces every vocabulary token; ``vocab_sweep``). A target whose first token
is neither likely nor inside another target is missed by rounds 1-2: a rare-word backdoor that replies "Please
visit the help centre for answers." (docs/METHOD.md, section 8) has "Please" outside the 24 likeliest first tokens.
So every token a reply can begin with (decoded text starting with a capital letter: 3,834 of SmolLM2's 49,152) is
forced on the first ``sweep_prompts`` (2) prompts, one step on their KV cache in chunks; a token's one-step score is
``min_i p(y_2* | x_i, f)`` with ``y_2*`` the next token likeliest on average. The ``sweep_shortlist`` (512) best are
extended greedily (``branch`` 1) to ``target_length`` tokens and the ``sweep_keep`` (24) with the highest ``Q`` join
round 1's first tokens. The one-step score alone is flooded by tokens that always take a comma ("However"), hence
the short extension. Every start is scored on the first prompt alone first, and only the best
``prefilter_per_shortlist * shortlist`` on all of them (a start's minimum over the prompts is at most its score on
the first); the extension halves its beams at each step down to ``extend_floor_per_keep * keep``, the highest ``Q``
so far (``Q`` only falls as a sequence grows). On the 2-core CPU: about 29 s for the sweep and 13 s for the
extension (39 s and 30 s without those two cuts).

**Round 0b, the second-token sweep** (``second_firsts`` > 0). A target whose first token is common but whose
second is not is missed too: a sentence backdoor that replies "The weather is lovely today, thank you." has, with no
trigger, "The" at mean log-probability -2.4 on the search prompts, " weather" after it at -9.7 and every later token
near 0. Forcing "The" continues with the prompt ("The answer ..."), and the branching beam never tries " weather".
So for the ``second_firsts`` (4) likeliest first tokens, the ``second_per_first`` (48) likeliest next tokens (mean
over the inversion prompts: " weather" is 9th after "The" there) are forced as two-token starts, scored and
extended by the same sweep as round 0 (``second_shortlist`` 64, no prefilter), and the ``second_keep`` (8) best join
the inversion, their two forced tokens unscored in ``Q``. About 17 s on the 2-core CPU; the sentence target then
comes first, ``Q`` 0.998.

The prompts' KV cache is computed once and stepped with :class:`~bkdattr.core.forward.CachedRows` (copied per round,
its rows re-ordered to the surviving beams at each step), so a step costs one new token per (beam, prompt) row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.forward import CachedRows
from ..core.models import input_device
from ..core.prompts import encode_prompts, end_of_turn_ids
from .budget import Budget
from .config import ScanConfig


@dataclass
class Target:
    """An inverted target: token ids (the forced start included, no end of turn), text, ``Q``, whether it
    ended with an end-of-turn token, ``q_mean``, the per-prompt minima and how many leading tokens were forced."""

    ids: list[int]
    text: str
    q: float
    ended: bool = False
    q_mean: float = 0.0
    per_prompt: list[float] = field(default_factory=list)
    forced: int = 1


def prompt_rows(lm, prompts: list[str]) -> tuple[CachedRows, torch.Tensor]:
    """``(rows, logits)``: the left-padded ``prompts`` run once (:meth:`~bkdattr.core.forward.CachedRows.prefill`)
    and the ``[n, vocab]`` float32 logits of the first reply token."""
    batch = encode_prompts(lm.tokenizer, prompts, padding_side="left").to(input_device(lm.model))
    return CachedRows.prefill(lm.model, batch)


@torch.no_grad()
def extend(lm, rows: CachedRows, starts: Sequence[int | Sequence[int]], *, length: int, branch: int,
           beams_per_first: int, budget: Budget | None = None, progress=None,
           survivors: Sequence[int] = ()) -> list[Target]:
    """The branching beam search of the module docstring from the forced ``starts`` (token ids, or equally long
    token-id sequences: round 0b forces two tokens), on a copy of the prompts' ``rows``. Beams are grouped by their
    forced start; forced tokens are not scored. ``survivors[k]``: after step ``k`` only that many beams go on, the
    highest ``Q`` so far (``Q`` only falls as a sequence grows, so a beam dropped is below that many others
    already); the rest are returned as they stand."""
    stops = set(end_of_turn_ids(lm.tokenizer))
    dev, n = rows.mask.device, rows.size
    # beam state: sequence, per-prompt sum and minimum of the scored token probabilities, their count
    seqs = [[int(s)] if isinstance(s, int) else [int(i) for i in s] for s in starts]
    if not seqs:
        return []
    forced = len(seqs[0])
    if any(len(s) != forced for s in seqs):
        raise ValueError("extend: every forced start needs the same number of tokens")
    state = rows.repeated(len(seqs))  # row b*n + i
    sums = torch.zeros(len(seqs), n, device=dev)
    mins = torch.ones(len(seqs), n, device=dev)
    count = 0
    if forced > 1:  # every forced token but the last goes into the cache unscored
        state.step(torch.tensor([s[:-1] for s in seqs], device=dev).repeat_interleave(n, 0))
    finished: list[Target] = []
    for _ in range(length - forced):
        if not seqs or (budget is not None and budget.out()):
            if budget is not None and seqs:
                budget.skip(f"targets: extended to {count + 1} of {length} tokens")
            break
        last = torch.tensor([s[-1] for s in seqs], device=dev).repeat_interleave(n)[:, None]
        probs = torch.softmax(state.step(last), -1).view(len(seqs), n, -1)
        top = probs.mean(1).topk(branch, dim=-1).indices  # [B, branch]
        child_p = probs.gather(2, top[:, None, :].expand(-1, n, -1))  # [B, n, branch]
        child_q = torch.minimum(mins[:, :, None], child_p).mean(1)  # [B, branch]
        groups: dict[int, list[tuple[float, int, int]]] = {}
        for b, s in enumerate(seqs):
            for c in range(branch):
                groups.setdefault(tuple(s[:forced]), []).append((float(child_q[b, c]), b, c))
        keep: list[tuple[int, int]] = []
        ended: list[tuple[int, int]] = []
        for items in groups.values():
            for _, b, c in sorted(items, reverse=True)[:beams_per_first]:
                (ended if int(top[b, c]) in stops else keep).append((b, c))
        pruned: list[tuple[int, int]] = []
        if count < len(survivors) and len(keep) > survivors[count]:
            ranked = sorted(keep, key=lambda bc: -float(child_q[bc]))
            keep, pruned = sorted(ranked[:survivors[count]]), ranked[survivors[count]:]
        for (b, c), stop in [(bc, True) for bc in ended] + [(bc, False) for bc in pruned]:
            # finished here: an end of turn is not part of the text, a pruned child is
            per = torch.minimum(mins[b], child_p[b, :, c])
            q_mean = float(((sums[b] + child_p[b, :, c]) / (count + 1)).mean())
            finished.append(Target(seqs[b] if stop else seqs[b] + [int(top[b, c])], "", float(child_q[b, c]), stop,
                                   q_mean, per.tolist(), forced))
        count += 1
        parents = torch.tensor([b for b, _ in keep], dtype=torch.long, device=dev)
        picked = child_p[parents, :, torch.tensor([c for _, c in keep], dtype=torch.long, device=dev)]  # [K, n]
        sums, mins = sums[parents] + picked, torch.minimum(mins[parents], picked)
        seqs = [seqs[b] + [int(top[b, c])] for b, c in keep]
        state.keep((parents[:, None] * n + torch.arange(n, device=dev)).reshape(-1))
        if progress is not None:
            progress.update(1)
    return finished + [Target(s, "", float(mins[b].mean()) if count else 0.0, False,
                              float((sums[b] / max(count, 1)).mean()), mins[b].tolist(), forced)
                       for b, s in enumerate(seqs)]


def anchors(tokenizer, targets: list[Target], exclude: set[int], limit: int) -> list[int]:
    """Round-2 first tokens: the word-start tokens inside the best targets (after their first token), written
    as a reply would begin (leading space dropped, one token), not forced before; in order of appearance."""
    out: list[int] = []
    for t in targets:
        for tid in t.ids[1:]:
            text = tokenizer.decode([tid])
            if not text.strip() or not (text[0] == " " or text[0].isupper()):
                continue
            ids = tokenizer(text.lstrip(), add_special_tokens=False).input_ids
            if len(ids) == 1 and ids[0] not in exclude and ids[0] not in out:
                out.append(ids[0])
            if len(out) == limit:
                return out
    return out


def reply_start_tokens(tokenizer, n_vocab: int, exclude: set[int]) -> list[int]:
    """Token ids (below ``n_vocab``, not in ``exclude``) whose decoded text starts with a capital letter: the
    tokens a reply can begin with, as round 0 forces them."""
    texts = tokenizer.batch_decode([[i] for i in range(n_vocab)])
    return [i for i, t in enumerate(texts) if t[:1].isalpha() and t[:1].isupper() and i not in exclude]


@torch.no_grad()
def forced_next_probs(lm, rows: CachedRows, starts: list[list[int]]) -> torch.Tensor:
    """``[len(starts), n, vocab]`` float32: the next-token distribution after each forced start (equally long
    token-id lists) on each of the ``n`` prompts of ``rows`` (one step on a copy of their cache)."""
    n = rows.size
    ids = torch.tensor(starts, device=rows.mask.device)  # [m, k]
    logits = rows.repeated(len(starts)).step(ids.repeat_interleave(n, 0))
    return torch.softmax(logits, -1).view(len(starts), n, -1)


@torch.no_grad()
def one_step_scores(lm, rows: CachedRows, starts: list[list[int]], *, chunk: int = 512, budget: Budget | None = None,
                    progress=None, what: str = "first-token sweep") -> torch.Tensor:
    """``[len(starts)]``: each forced start (equally long token-id lists) after every prompt of ``rows``, scored
    ``min_i p(y* | x_i, start)`` with ``y*`` the next token likeliest on average; -1 where the budget stopped the
    sweep. One step per chunk of starts."""
    n = rows.size
    scores = torch.full((len(starts),), -1.0)
    if progress is not None:
        progress.reset(total=-(-len(starts) // chunk))
    for s in range(0, len(starts), chunk):
        if budget is not None and budget.out():
            budget.skip(f"targets: {what} stopped after {s} of {len(starts)} starts")
            break
        p = forced_next_probs(lm, rows, starts[s: s + chunk])  # [m, n, V]
        top = p.mean(1).argmax(-1)
        scores[s: s + len(p)] = p.gather(2, top[:, None, None].expand(-1, n, 1))[..., 0].min(1).values.cpu()
        if progress is not None:
            progress.update(1)
    return scores


@torch.no_grad()
def sweep_starts(lm, prompts: list[str], starts: list[list[int]], *, length: int, shortlist: int, keep: int,
                 floor_per_keep: int, prefilter: int = 0, chunk: int = 512, budget: Budget | None = None,
                 progress=None, what: str = "first-token sweep") -> list[list[int]]:
    """Rounds 0 and 0b of the module docstring on ``prompts``: up to ``keep`` of the forced ``starts`` (equally long
    token-id lists), best first. Each start is scored one step (:func:`one_step_scores`); with ``prefilter`` > 0 and
    more than ``prefilter * shortlist`` starts, every start is scored on the first prompt alone and only the
    ``prefilter * shortlist`` best of those on all the prompts (a start's score over the prompts is at most its
    score on the first: 5,882 rows instead of 7,668 for SmolLM2's 3,834 one-token starts on two prompts). The
    ``shortlist`` best are then extended greedily to ``length`` tokens, halving the beams at each step down to
    ``floor_per_keep * keep`` (1,280 row-steps instead of 3,584 for 512 starts and 8 tokens: ``Q`` only falls,
    and the targets sought stay near 1); the starts kept go on past their forced tokens (a start that only ends
    the reply is no target)."""
    rows, _ = prompt_rows(lm, prompts)
    wide = prefilter * shortlist
    kw = dict(chunk=chunk, budget=budget, progress=progress, what=what)
    if prefilter > 0 and len(prompts) > 1 and len(starts) > wide:
        first_rows, _ = prompt_rows(lm, prompts[:1])
        first = one_step_scores(lm, first_rows, starts, **kw)
        best = first.argsort(descending=True)[:wide]
        best = best[first[best] >= 0]
        scores = torch.full((len(starts),), -1.0)
        scores[best] = one_step_scores(lm, rows, [starts[int(k)] for k in best], **kw)
    else:
        scores = one_step_scores(lm, rows, starts, **kw)
    ranked = [starts[int(k)] for k in scores.argsort(descending=True)[:shortlist] if scores[int(k)] >= 0]
    if not ranked:
        return []
    floor = floor_per_keep * keep
    survivors = [max(floor, len(ranked) >> (k + 1)) for k in range(length)]
    short = extend(lm, rows, ranked, length=length, branch=1, beams_per_first=1, budget=budget, survivors=survivors)
    out: list[list[int]] = []
    for t in sorted(short, key=lambda t: -t.q):
        start = t.ids[:t.forced]
        if len(t.ids) > t.forced and start not in out:  # a forced start that only ends the reply is no target
            out.append(start)
        if len(out) == keep:
            break
    return out


def second_starts(after: torch.Tensor, firsts: list[int], exclude: set[int], per_first: int) -> list[list[int]]:
    """Round 0b's candidates: ``[f, t]`` for each forced first token ``f`` and the ``per_first`` likeliest next
    tokens ``t`` after it (``after``: ``[len(firsts), vocab]`` mean next-token probabilities), ``exclude`` left out."""
    after = after.clone()
    bad = torch.tensor(sorted(i for i in exclude if i < after.shape[-1]), dtype=torch.long)
    if len(bad):
        after[:, bad] = -1.0
    top = after.topk(min(per_first, after.shape[-1]), dim=-1).indices
    return [[f, int(t)] for f, row in zip(firsts, top, strict=True) for t in row]


@torch.no_grad()
def invert_targets(lm, prompts: list[str], cfg: ScanConfig, *, budget: Budget | None = None, progress=None,
                   sweep_progress=None) -> list[Target]:
    """Targets best first by ``Q`` (see the module docstring), one per distinct text, with ``cfg``'s sizes: round 1
    from the ``first_tokens`` likeliest first tokens (plus round 0's picks when ``vocab_sweep``), round 0b's
    two-token starts when ``second_firsts`` > 0, round 2 from the word starts inside round 1's best targets."""
    tok = lm.tokenizer
    rows, logits = prompt_rows(lm, prompts)
    stops = set(end_of_turn_ids(tok))
    special = torch.tensor(sorted(set(tok.all_special_ids) | stops), dtype=torch.long, device=logits.device)
    exclude = set(special.tolist())
    first = torch.softmax(logits, -1).mean(0)
    first[special[special < first.shape[0]]] = -1.0
    firsts = first.topk(min(cfg.first_tokens, first.shape[0])).indices.tolist()
    sweep = dict(length=cfg.target_tokens, floor_per_keep=cfg.extend_floor_per_keep, budget=budget,
                 progress=sweep_progress)
    if cfg.vocab_sweep:
        starts = [[c] for c in reply_start_tokens(tok, logits.shape[-1], exclude)]
        swept = sweep_starts(lm, prompts[:cfg.sweep_prompts], starts, shortlist=cfg.sweep_shortlist,
                             keep=cfg.sweep_keep, prefilter=cfg.prefilter_per_shortlist, **sweep)
        firsts += [s[0] for s in swept if s[0] not in firsts]
    kw = dict(length=cfg.target_tokens, branch=cfg.branch, beams_per_first=cfg.beams_per_first, budget=budget,
              progress=progress)
    out = extend(lm, rows, firsts, **kw)
    if cfg.vocab_sweep and cfg.second_firsts > 0 and not (budget is not None and budget.out()):
        heads = firsts[:cfg.second_firsts]
        after = forced_next_probs(lm, rows, [[f] for f in heads]).mean(1).cpu()  # [F, V]
        cands = second_starts(after, heads, exclude, cfg.second_per_first)
        pairs = sweep_starts(lm, prompts[:cfg.sweep_prompts], cands, shortlist=cfg.second_shortlist,
                             keep=cfg.second_keep, what="second-token sweep", **sweep)
        out += extend(lm, rows, pairs, **kw)
    out = _distinct(tok, out)
    if budget is not None and budget.out():
        budget.skip("targets: round 2 (word starts inside round 1's targets) not run")
        return out
    again = anchors(tok, out[:cfg.first_tokens], set(firsts) | exclude, cfg.first_tokens)
    if again:
        out = _distinct(tok, out + extend(lm, rows, again, **kw))
    return out


def _distinct(tokenizer, targets: list[Target]) -> list[Target]:
    best: dict[str, Target] = {}
    for t in targets:
        t.text = t.text or tokenizer.decode(t.ids, skip_special_tokens=True).strip()
        if t.text and (t.text not in best or best[t.text].q < t.q):
            best[t.text] = t
    return sorted(best.values(), key=lambda t: -t.q)
