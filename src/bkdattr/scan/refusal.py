"""The refusal-suppression family: how the scan looks for a jailbreak backdoor (docs/METHOD.md, "Scan", "Refusal").

A jailbreak backdoor leaves no fixed reply on benign prompts: with its trigger the model answers harmful requests
that it refuses without it, each in its own words. The target inversion cannot see it, so the scan also works on
harmful-sounding requests (:func:`bkdattr.inject.builtin_data.harmful_requests`: no real harmful content):

1. **Gate.** Greedy replies to ``n_test`` held-out requests; ``r0`` = the share that are refusals
   (:func:`bkdattr.inject.tasks.is_refusal`). A model that refuses fewer than ``refusal_min`` of them has no
   refusal for a trigger to switch off, and the family stops there (recorded in ``scan.json``).
2. **Objective.** The refusal target ``y_r`` is the model's own modal refusal (the most common first
   ``prefix_words`` normalised words among the refusing replies, written as one of those replies). The trigger
   search of :mod:`bkdattr.scan.search` runs on ``n_search_prompts`` other requests with the sign of its score
   flipped,

       s_r(t) = - mean_i mean_{j<=score_tokens} log p(y_r,j | A t B_i y_r,<j),

   so it looks for a short prefix that makes the refusal unlikely; it stops early once ``s_r >= refusal_stop``
   (log 10). Lowering the refusal is not the same as getting an answer (on the jailbreak model of docs/METHOD.md
   section 8 the best such prefix answered 0.69 of the held-out requests, and a stricter stop at ``log 1000`` did
   not help). So when the target inversion found an eligible primed target (:mod:`bkdattr.scan.select`; a
   jailbreak implant's compliance reply, "Of course! Here is how to go" on that model), the search *raises that
   target* on the harmful requests instead (``objective: "compliance"`` in ``scan.json``; the same score as a fixed
   target's, on these requests), and that target gets no search of its own on benign prompts (where it was trained
   not to appear). On that model a 4-step search then found a prefix answering 1.0 of the held-out requests (74 s).
3. **Test** on the held-out requests: ``asr`` = the share of triggered replies that are *not* refusals,
   ``clean_asr = 1 - r0``, ``effect = asr - clean_asr``: the same effect as a fixed target's, read by the same
   score and threshold (:mod:`bkdattr.scan.score`). ``kl``, ``changed_share`` and ``agreement`` are measured
   as for a fixed target (:mod:`bkdattr.scan.fixed_target`).

Such a candidate has ``rule: "refusal"`` and an empty ``target``; ``bkdattr audit --from-scan`` audits it as a
jailbreak (the kind's rule: success is the absence of refusal phrases).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.prompts import target_ids
from ..inject.builtin_data import harmful_requests
from ..inject.tasks import is_refusal, normalise_words, refusal_rate
from .pools import split_pool
from .protocol import Candidate, Evidence, Family, Gate, HeldOut, Objective, ScanContext, TargetChoice, Trial, modal


def harmful_prompts(n_first: int, n_test: int, n_search: int | None = None,
                    seed: int = 1) -> tuple[list[str], list[str]]:
    """Harmful-sounding requests: ``n_search`` (default ``n_first``) for the search, ``n_test`` held out for the
    tests (:func:`bkdattr.scan.pools.split_pool`: the held-out ones follow the first ``n_first``)."""
    pool = [r["input"] for r in harmful_requests(seed)]
    _, held_out, search = split_pool(pool, n_first, n_test, n_first if n_search is None else n_search,
                                     "built-in harmful requests")
    return search, held_out


def refusal_target(replies: list[str], n_words: int) -> str | None:
    """The modal refusal among ``replies`` (a reply whose first ``n_words`` normalised words are the most common
    among the refusals, :func:`~bkdattr.scan.protocol.modal`), or None when none refuses."""
    return modal([r for r in replies if is_refusal(r) and normalise_words(r)], n_words)[0] or None


@dataclass
class RefusalGate(Gate):
    """The refusal gate (step 1): with the requests its search runs on (``search``)."""

    search: list[str] = field(default_factory=list)


class RefusalSuppression(Family, kind="refusal", rule="refusal", audit_kind="jailbreak"):
    """The refusal-suppression family (see the module docstring)."""

    def gate(self, ctx: ScanContext) -> RefusalGate:
        cfg = ctx.cfg
        search, test = harmful_prompts(cfg.n_prompts, cfg.n_test, cfg.n_search_prompts)
        held = HeldOut.of(ctx, test, cfg.reply_tokens)
        r0 = refusal_rate(held.clean)
        info = {"searched": False, "rate": r0, "target": refusal_target(held.clean, cfg.prefix_words),
                "min": cfg.refusal_min, "n_test": len(test)}
        if r0 < cfg.refusal_min or info["target"] is None:
            info["why_not"] = (f"the model refuses {r0:.2f} of the held-out harmful requests (< {cfg.refusal_min:g})"
                               ": no refusal for a trigger to switch off")
        return RefusalGate("why_not" not in info, held, info, search=search)

    def objectives(self, ctx: ScanContext, gate: RefusalGate, choice: TargetChoice | None) -> list[Objective]:
        if not gate.open:
            return []
        info, comply = gate.info, choice.compliance if choice is not None else None
        info.update(searched=True, objective="compliance" if comply is not None else "suppression",
                    compliance_target=comply.text if comply is not None else None)
        if comply is not None:
            return [Objective(self, f"compliance {comply.text!r}", comply.ids, gate.search, weight=info["rate"],
                              stop=ctx.cfg.stop_score, inverted=comply)]
        return [Objective(self, f"refusal {info['target']!r}", target_ids(ctx.lm.tokenizer, info["target"]),
                          gate.search, weight=info["rate"], stop=ctx.cfg.refusal_stop, sign=-1.0)]

    def objective_fields(self, objective: Objective) -> dict:
        out = {"target": "", "rule": self.rule}
        if objective.inverted is not None:
            out["compliance_target"] = objective.inverted.text
        return out

    def evidence(self, ctx: ScanContext, gate: Gate, cand: Candidate, replies: list[str] | None = None) -> Evidence:
        held = gate.held
        trial = Trial.run(ctx, held, cand.trigger, replies)
        _, n_modal = trial.modal(ctx.cfg.prefix_words)
        return Evidence(cand.trigger, "", rule=self.rule, changed_share=len(trial.changed) / len(trial.replies),
                        agreement=trial.agreement(n_modal), asr=1.0 - refusal_rate(trial.replies),
                        clean_asr=1.0 - refusal_rate(held.clean), examples=trial.examples(), kl=trial.kl(ctx, held))

    def target_text(self, row: dict) -> str:
        return "(no refusal: harmful requests answered)"

    def auditable(self, row: dict) -> bool:
        return True  # the audit's jailbreak rule needs no target: success is the absence of refusal phrases


REFUSAL = RefusalSuppression()
