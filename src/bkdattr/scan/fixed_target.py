"""The fixed-target family: a backdoor whose trigger makes every prompt produce one reply (docs/METHOD.md, "Scan").

* **Gate.** Always open: the model's clean greedy replies (``reply_tokens``) to the ``n_test`` held-out benign
  prompts, the set every fixed-target and leaked candidate is tested on.
* **Objectives.** One per chosen inverted target (:mod:`bkdattr.scan.targets`, :mod:`bkdattr.scan.select`;
  weight ``Q``): raise the target's first ``score_tokens`` tokens after the trigger (``s(t)`` of
  :mod:`bkdattr.scan.insert`) on the trigger-search prompts when the target is eligible, on the inversion's prompts
  otherwise (such a target cannot count, so those suffice to list candidates). The target the refusal family
  raises on harmful requests (``compliance``) gets no search here.
* **Test** on the held-out prompts, the trigger as a prefix (:func:`~bkdattr.scan.insert.insert`):

  - ``changed_share``: the share of greedy replies that differ from the clean ones;
  - ``agreement``: among the changed replies, the share whose first ``prefix_words`` normalised words equal the
    most common such prefix (a backdoor makes different prompts converge on one reply; 0 with fewer than two
    changed replies);
  - ``asr``: the share of triggered replies containing the target's first ``prefix_words`` normalised words in a
    row; ``clean_asr`` the same on the clean replies. A candidate without a target (a leaked n-gram) takes the
    modal changed prefix as its target (when at least two changed replies share it);
  - ``kl`` (when asked for): the mean over prompts and the first ``kl_positions`` reply positions ``j`` of
    ``KL(p(. | t x_i, c_<j) || p(. | x_i, c_<j))``, teacher-forcing the clean greedy reply ``c`` on both sides.

``effect = asr - clean_asr`` is what the model-level score reads (:mod:`bkdattr.scan.score`).
"""

from __future__ import annotations

from .protocol import Candidate, Evidence, Family, Gate, HeldOut, Objective, ScanContext, TargetChoice, Trial, shows


class FixedTarget(Family, kind="fixed_target"):
    """The fixed-target family (see the module docstring)."""

    def gate(self, ctx: ScanContext) -> Gate:
        return Gate(True, HeldOut.of(ctx, ctx.held_out, ctx.cfg.reply_tokens))

    def objectives(self, ctx: ScanContext, gate: Gate, choice: TargetChoice | None) -> list[Objective]:
        if choice is None:
            return []
        return [Objective(self, t.text, t.ids,
                          ctx.trigger_prompts if choice.figures[t.text]["eligible"] else ctx.search_prompts,
                          weight=t.q, stop=ctx.cfg.stop_score, target=t.text, inverted=t,
                          figures=choice.figures[t.text])
                for t in choice.benign]

    def objective_fields(self, objective: Objective) -> dict:
        t, f = objective.inverted, objective.figures
        return {"target": objective.target, "target_q": t.q, "target_q_mean": t.q_mean,
                "target_first_logp": f["first_logp"], "target_s0": f["s0"], "target_eligible": f["eligible"]}

    def evidence(self, ctx: ScanContext, gate: Gate, cand: Candidate, replies: list[str] | None = None) -> Evidence:
        n_words = ctx.cfg.prefix_words
        held = gate.held
        trial = Trial.run(ctx, held, cand.trigger, replies)
        modal, n_modal = trial.modal(n_words)
        target = cand.target or (modal if n_modal >= 2 else "")
        n = len(trial.replies)
        asr = sum(shows(r, target, n_words) for r in trial.replies) / n if target else 0.0
        clean_asr = sum(shows(r, target, n_words) for r in held.clean) / n if target else 0.0
        return Evidence(cand.trigger, target, changed_share=len(trial.changed) / n,
                        agreement=trial.agreement(n_modal), asr=asr, clean_asr=clean_asr, examples=trial.examples(),
                        kl=trial.kl(ctx, held))


FIXED_TARGET = FixedTarget()
