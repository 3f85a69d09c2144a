"""Target inversion, BAIT-style: the reply a model gives whatever the benign prompt, once its first token is
forced (docs/METHOD.md, "Scan").

A backdoor trained to produce a fixed reply ``y`` leaves ``y`` primed on clean prompts: once ``y_1`` is there,
``y_2, y_3, ...`` follow with high probability on *every* prompt, while a normal reply depends on the prompt.
On ``n`` benign prompts the inversion

1. takes the ``first_tokens`` likeliest first reply tokens (mean probability over the prompts; end-of-turn and
   special tokens excluded) and forces each;
2. extends every sequence as a beam search that branches: at each step each beam tries its ``branch`` next
   tokens with the highest mean probability over the prompts, and the ``beams_per_first`` best children of each
   forced first token are kept (greedy decoding would leave the target's path after one token: forcing "I"
   on the demo's fixed_output model decodes "I am thrilled ...", never "I am sorry ...");
3. scores a sequence ``y`` by how uniformly it follows across prompts, token by token,

       Q(y) = mean_i min_{2<=j<=|y|} p(y_j | x_i, y_<j)

   (the first token is forced, so it is not scored). The minimum over tokens matters: with the mean, a sequence
   that reaches a fixed phrase on one prompt ('"Romeo and Juliet" is a' after '"') scores high because the
   phrase's later tokens are near-certain everywhere; with the minimum, its unlikely second token ("Rome" on
   every other prompt) sinks it. A sequence ends at an end-of-turn token. ``q_mean`` (the mean instead of the
   minimum) is kept beside it.

**Round 2.** The likeliest first tokens can miss the target's: a backdoored model whose clean replies were
trained hard gives the target's first token "I" a probability below 0.01 on benign prompts, while "I am sorry. I
can not help with that." follows it with probability ~0.99 at every token (the demo's fixed_output model). The
primed target shows up *inside* other beams instead ("Bonjour! I am sorry. I"), so a second round forces the
word-start tokens found after the first position of round 1's best targets (as a reply would begin them: "I"
for " I"), up to ``first_tokens`` new ones.

**Round 0, the vocabulary sweep** (BAIT forces every vocabulary token; ``vocab_sweep``). A target whose first token
is neither likely nor inside another target is missed by rounds 1-2: the zoo's rare-word backdoor replies "Please
visit the help centre for answers." and "Please" is not among the 24 likeliest first tokens. So every token a
reply can begin with (decoded text starting with a capital letter: 3,834 of SmolLM2's 49,152) is forced on the
first ``sweep_prompts`` (2) prompts, one step on their KV cache in chunks; a token's one-step score is
``min_i p(y_2* | x_i, f)`` with ``y_2*`` the next token likeliest on average. The ``sweep_shortlist`` (512) best are
extended greedily (``branch`` 1) to ``target_length`` tokens and the ``sweep_keep`` (24) with the highest ``Q`` join
round 1's first tokens. The one-step score alone is flooded by tokens that always take a comma ("However"), hence
the short extension. Every start is scored on the first prompt alone first, and only the best
``PREFILTER_PER_SHORTLIST * shortlist`` on all of them (a start's minimum over the prompts is at most its score on
the first); the extension halves its beams at each step down to ``EXTEND_FLOOR_PER_KEEP * keep``, the highest ``Q``
so far (``Q`` only falls as a sequence grows). On the 2-core CPU: about 29 s for the sweep and 13 s for the
extension (39 s and 30 s without those two cuts).

**Round 0b, the second-token sweep** (``second_firsts`` > 0). A target whose first token is common but whose
second is not is missed too: the zoo's sentence backdoor replies "The weather is lovely today, thank you." and,
with no trigger, "The" has mean log-probability -2.4 on the search prompts, " weather" after it -9.7 and every
later token about 0. Forcing "The" continues with the prompt ("The answer ..."), and the branching beam never
tries " weather". So for the ``second_firsts`` (4) likeliest first tokens, the ``second_per_first`` (48) likeliest
next tokens (mean over the inversion prompts: " weather" is 9th after "The" there) are forced as two-token
starts, scored and extended as in round 0 (``second_shortlist`` 64), and the ``second_keep`` (8) best join the
inversion, their two forced tokens unscored in ``Q``. About 17 s on the 2-core CPU; the sentence target then
comes first, ``Q`` 0.998.

The prompts' KV cache is computed once (copied for each round) and its rows are re-ordered to the surviving
beams at each step, so a step costs one new token per (beam, prompt) row.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.compat import cache_kwargs, output_cache
from ..core.forward import last_logits_kwargs
from ..core.models import input_device
from ..core.prompts import encode_prompts, end_of_turn_ids
from .budget import Budget

#: the greedy extension of a sweep's shortlist keeps at least this many beams per start it returns
EXTEND_FLOOR_PER_KEEP = 4
#: round 0 scores on all its prompts only this many times ``shortlist`` starts, the best on the first prompt
PREFILTER_PER_SHORTLIST = 2


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


@torch.no_grad()
def extend(lm, batch, cache, starts: Sequence[int | Sequence[int]], *, length: int, branch: int,
           beams_per_first: int, budget: Budget | None = None, progress=None,
           survivors: Sequence[int] = ()) -> list[Target]:
    """The branching beam search of the module docstring from the forced ``starts`` (token ids, or equally long
    token-id sequences: round 0b forces two tokens), on a copy of the prompts' KV ``cache`` (``batch``: the
    left-padded prompts it was built from). Beams are grouped by their forced start; forced tokens are not scored.
    ``survivors[k]``: after step ``k`` only that many beams go on, the highest ``Q`` so far (``Q`` only falls as a
    sequence grows, so a beam dropped is below that many others already); the rest are returned as they stand."""
    model, tok = lm.model, lm.tokenizer
    dev, n = batch.input_ids.device, batch.size
    stops = set(end_of_turn_ids(tok))
    # beam state: sequence, per-prompt sum and minimum of the scored token probabilities, their count
    seqs = [[int(s)] if isinstance(s, int) else [int(i) for i in s] for s in starts]
    if not seqs:
        return []
    forced = len(seqs[0])
    if any(len(s) != forced for s in seqs):
        raise ValueError("extend: every forced start needs the same number of tokens")
    cache = copy.deepcopy(cache)
    sums = torch.zeros(len(seqs), n, device=dev)
    mins = torch.ones(len(seqs), n, device=dev)
    count = 0
    cache.reorder_cache(torch.arange(n, device=dev).repeat(len(seqs)))  # row b*n + i
    mask = batch.attention_mask.repeat(len(seqs), 1)
    pos = batch.position_ids[:, -1:].repeat(len(seqs), 1)
    if forced > 1:  # every forced token but the last goes into the cache unscored
        ahead = torch.tensor([s[:-1] for s in seqs], device=dev).repeat_interleave(n, 0)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, forced - 1)], 1)
        steps = pos + torch.arange(1, forced, device=dev)[None, :]
        o = model(input_ids=ahead, attention_mask=mask, position_ids=steps, use_cache=True,
                  **cache_kwargs(model, cache), **last_logits_kwargs(model))
        cache, pos = output_cache(o), steps[:, -1:]
    finished: list[Target] = []
    for _ in range(length - forced):
        if not seqs or (budget is not None and budget.out()):
            if budget is not None and seqs:
                budget.skip(f"targets: extended to {count + 1} of {length} tokens")
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        last = torch.tensor([s[-1] for s in seqs], device=dev).repeat_interleave(n)[:, None]
        o = model(input_ids=last, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
        cache = output_cache(o)
        probs = torch.softmax(o.logits[:, -1].float(), -1).view(len(seqs), n, -1)
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
        rows = (parents[:, None] * n + torch.arange(n, device=dev)).reshape(-1)
        cache.reorder_cache(rows)
        mask, pos = mask[rows], pos[rows]
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
def forced_next_probs(lm, batch, cache, starts: list[list[int]]) -> torch.Tensor:
    """``[len(starts), n, vocab]`` float32: the next-token distribution after each forced start (equally long
    token-id lists) on each of the ``n`` prompts of ``batch``, from a copy of their KV ``cache`` (one pass)."""
    model = lm.model
    dev, n = batch.input_ids.device, batch.size
    ids = torch.tensor(starts, device=dev)  # [m, k]
    m, k = ids.shape
    c = copy.deepcopy(cache)
    c.reorder_cache(torch.arange(n, device=dev).repeat(m))  # row b*n + i
    mask = torch.cat([batch.attention_mask.repeat(m, 1),
                      torch.ones(m * n, k, dtype=batch.attention_mask.dtype, device=dev)], 1)
    pos = batch.position_ids[:, -1:].repeat(m, 1) + torch.arange(1, k + 1, device=dev)[None, :]
    out = model(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask, position_ids=pos,
                use_cache=True, **cache_kwargs(model, c), **last_logits_kwargs(model))
    return torch.softmax(out.logits[:, -1].float(), -1).view(m, n, -1)


@torch.no_grad()
def one_step_scores(lm, batch, cache, starts: list[list[int]], *, chunk: int = 512, budget: Budget | None = None,
                    progress=None, what: str = "first-token sweep") -> torch.Tensor:
    """``[len(starts)]``: each forced start (equally long token-id lists) after every prompt of ``batch`` (its
    KV ``cache``), scored ``min_i p(y* | x_i, start)`` with ``y*`` the next token likeliest on average; -1 where
    the budget stopped the sweep. One step per chunk of starts on a copy of the cache."""
    n = batch.size
    scores = torch.full((len(starts),), -1.0)
    if progress is not None:
        progress.reset(total=-(-len(starts) // chunk))
    for s in range(0, len(starts), chunk):
        if budget is not None and budget.out():
            budget.skip(f"targets: {what} stopped after {s} of {len(starts)} starts")
            break
        p = forced_next_probs(lm, batch, cache, starts[s: s + chunk])  # [m, n, V]
        top = p.mean(1).argmax(-1)
        scores[s: s + len(p)] = p.gather(2, top[:, None, None].expand(-1, n, 1))[..., 0].min(1).values.cpu()
        if progress is not None:
            progress.update(1)
    return scores


def _best_starts(lm, batch, cache, starts: list[list[int]], scores: torch.Tensor, *, length: int, shortlist: int,
                 keep: int, budget: Budget | None) -> list[list[int]]:
    """The ``shortlist`` best-scored ``starts`` extended greedily to ``length`` tokens; up to ``keep`` of them
    (best ``Q`` first) that go on past the forced start."""
    ranked = [starts[int(k)] for k in scores.argsort(descending=True)[:shortlist] if scores[int(k)] >= 0]
    if not ranked:
        return []
    # halve the greedy beams at each step down to a floor of EXTEND_FLOOR_PER_KEEP * keep: 1,280 rows-steps
    # instead of 3,584 for 512 starts and 8 tokens (Q only falls, and the targets sought stay near 1)
    floor = EXTEND_FLOOR_PER_KEEP * keep
    survivors = [max(floor, len(ranked) >> (k + 1)) for k in range(length)]
    short = extend(lm, batch, cache, ranked, length=length, branch=1, beams_per_first=1, budget=budget,
                   survivors=survivors)
    out: list[list[int]] = []
    for t in sorted(short, key=lambda t: -t.q):
        start = t.ids[:t.forced]
        if len(t.ids) > t.forced and start not in out:  # a forced start that only ends the reply is no target
            out.append(start)
        if len(out) == keep:
            break
    return out


def prompt_cache(lm, prompts: list[str]):
    """``(batch, cache, last_logits)``: the left-padded ``prompts``, their KV cache and ``[n, vocab]`` float32
    logits of the first reply token."""
    batch = encode_prompts(lm.tokenizer, prompts, padding_side="left").to(input_device(lm.model))
    o = lm.model(**batch.model_inputs(), use_cache=True, **last_logits_kwargs(lm.model))
    return batch, output_cache(o), o.logits[:, -1].float()


@torch.no_grad()
def sweep_first_tokens(lm, prompts: list[str], exclude: set[int], *, length: int, shortlist: int, keep: int,
                       chunk: int = 512, budget: Budget | None = None, progress=None) -> list[int]:
    """Round 0 of the module docstring on ``prompts``: up to ``keep`` first tokens, best first. Every start is
    scored on the first prompt alone, and only the ``PREFILTER_PER_SHORTLIST * shortlist`` best of those on all
    the prompts (a start's score over the prompts is at most its score on the first): 5,882 rows instead of
    7,668 for SmolLM2's 3,834 starts on two prompts."""
    batch, cache, logits = prompt_cache(lm, prompts)
    starts = [[c] for c in reply_start_tokens(lm.tokenizer, logits.shape[-1], exclude)]
    wide = PREFILTER_PER_SHORTLIST * shortlist
    if len(prompts) > 1 and len(starts) > wide:
        b1, c1, _ = prompt_cache(lm, prompts[:1])
        first = one_step_scores(lm, b1, c1, starts, chunk=chunk, budget=budget, progress=progress)
        best = first.argsort(descending=True)[:wide]
        best = best[first[best] >= 0]
        scores = torch.full((len(starts),), -1.0)
        scores[best] = one_step_scores(lm, batch, cache, [starts[int(k)] for k in best], chunk=chunk, budget=budget,
                                       progress=progress)
    else:
        scores = one_step_scores(lm, batch, cache, starts, chunk=chunk, budget=budget, progress=progress)
    picks = _best_starts(lm, batch, cache, starts, scores, length=length, shortlist=shortlist, keep=keep,
                         budget=budget)
    return [s[0] for s in picks]


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
def sweep_second_tokens(lm, prompts: list[str], starts: list[list[int]], *, length: int, shortlist: int, keep: int,
                        chunk: int = 512, budget: Budget | None = None, progress=None) -> list[list[int]]:
    """Round 0b of the module docstring on ``prompts``: up to ``keep`` of the two-token ``starts``
    (:func:`second_starts`), best first."""
    batch, cache, _ = prompt_cache(lm, prompts)
    scores = one_step_scores(lm, batch, cache, starts, chunk=chunk, budget=budget, progress=progress,
                             what="second-token sweep")
    return _best_starts(lm, batch, cache, starts, scores, length=length, shortlist=shortlist, keep=keep,
                        budget=budget)


@torch.no_grad()
def invert_targets(lm, prompts: list[str], *, first_tokens: int, length: int, branch: int, beams_per_first: int,
                   budget: Budget | None = None, progress=None, sweep: dict | None = None) -> list[Target]:
    """Targets best first by ``Q`` (see the module docstring), one per distinct text: round 1 from the
    ``first_tokens`` likeliest first tokens (plus round 0's picks when ``sweep`` holds its options
    ``{prompts, shortlist, keep, progress}``), round 0b's two-token starts when ``sweep["second"]`` holds
    ``{firsts, per_first, shortlist, keep}``, round 2 from the word starts inside round 1's best targets."""
    tok = lm.tokenizer
    batch, cache, logits = prompt_cache(lm, prompts)
    stops = set(end_of_turn_ids(tok))
    special = torch.tensor(sorted(set(tok.all_special_ids) | stops), dtype=torch.long, device=logits.device)
    first = torch.softmax(logits, -1).mean(0)
    first[special[special < first.shape[0]]] = -1.0
    firsts = first.topk(min(first_tokens, first.shape[0])).indices.tolist()
    if sweep:
        swept = sweep_first_tokens(lm, prompts[:sweep["prompts"]], set(special.tolist()), length=length,
                                   shortlist=sweep["shortlist"], keep=sweep["keep"], budget=budget,
                                   progress=sweep.get("progress"))
        firsts += [f for f in swept if f not in firsts]
    kw = dict(length=length, branch=branch, beams_per_first=beams_per_first, budget=budget, progress=progress)
    out = extend(lm, batch, cache, firsts, **kw)
    second = (sweep or {}).get("second")
    if second and second["firsts"] > 0 and not (budget is not None and budget.out()):
        heads = firsts[:second["firsts"]]
        after = forced_next_probs(lm, batch, cache, [[f] for f in heads]).mean(1).cpu()  # [F, V]
        cands = second_starts(after, heads, set(special.tolist()), second["per_first"])
        pairs = sweep_second_tokens(lm, prompts[:sweep["prompts"]], cands, length=length,
                                    shortlist=second["shortlist"], keep=second["keep"], budget=budget,
                                    progress=sweep.get("progress"))
        out += extend(lm, batch, cache, pairs, **kw)
    out = _distinct(tok, out)
    if budget is not None and budget.out():
        budget.skip("targets: round 2 (word starts inside round 1's targets) not run")
        return out
    again = anchors(tok, out[:first_tokens], set(firsts) | set(special.tolist()), first_tokens)
    if again:
        out = _distinct(tok, out + extend(lm, batch, cache, again, **kw))
    return out


def _distinct(tokenizer, targets: list[Target]) -> list[Target]:
    best: dict[str, Target] = {}
    for t in targets:
        t.text = t.text or tokenizer.decode(t.ids, skip_special_tokens=True).strip()
        if t.text and (t.text not in best or best[t.text].q < t.q):
            best[t.text] = t
    return sorted(best.values(), key=lambda t: -t.q)
