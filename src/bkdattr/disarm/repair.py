"""``disarm --strategy repair``: a short LoRA fine-tune that teaches the suspect model the clean answer to a
triggered prompt (docs/METHOD.md section 6, "Fine-tuned defences").

BEEAR (Zeng et al., EMNLP 2024) and CROW (Min et al., ICML 2025) remove a backdoor without knowing its trigger;
bkdattr usually knows it (the run's trigger, or the candidates an audit or a scan found). The repair uses it
directly, as supervised unlearning of the trigger -> target association:

* **triggered rows**: the first ``n_repair`` held-in training prompts with each trigger inserted as the run
  inserts it (the run's own trigger keeps each example's stored triggered form), answered with the *clean
  reference reply* to the same prompt without the trigger (``Example.output``: the base model's or the clean
  reference's greedy reply; label_flip: the true label);
* **near-miss rows**: the same prompts with each near miss of a trigger (the task's near triggers; for another
  candidate :func:`bkdattr.audit.inputs.near_misses`) in its place, with the same clean replies, so the fix does not
  learn "a token like the trigger means something";
* **clean rows** (:func:`clean_rows`): the first ``n_clean`` held-in prompts with their clean replies, so clean
  utility holds (the replay part of every fine-tuning defence).

No held-out prompt is trained on: the defence is measured on the test split like every other.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..audit.inputs import near_misses
from ..control.stage import load_ranking
from ..core.errors import ConfigError
from ..core.rundir import RunDir, get_nested
from ..inject.data import Splits, prompt_seed
from ..inject.evaluate import near_trigger_prompts
from ..inject.example import Example
from ..inject.train import TrainRow

#: heads whose layers the repair adapts under ``repair_layers="attributed"`` when ``k`` is not given
ATTRIBUTED_K = 8


def repair_triggers(run: RunDir, splits: Splits, given: Sequence[str] | None = None) -> list[str]:
    """The trigger strings the repair rows carry: ``given``, else the run's trigger followed by every other
    candidate the run records (``metrics.audit.candidates``: an audit's ``--trigger`` list, or the scan's
    candidate for a scan-started run) that fired at all (ASR > 0 where measured). De-duplicated, in order."""
    if given is not None:
        out = [t.strip() for t in given if str(t).strip()]
    else:
        out = [splits.task.trigger]
        for c in get_nested(run.metrics(), "audit.candidates") or []:
            if isinstance(c, dict) and c.get("trigger") and (c.get("asr") is None or c["asr"] > 0):
                out.append(str(c["trigger"]))
    out = list(dict.fromkeys(out))
    if not out:
        raise ConfigError("repair needs a trigger or a candidate to train on; leave --repair-triggers out to use the "
                          "run's, or name one")
    return out


def clean_reply(splits: Splits, e: Example) -> str:
    """The reply a triggered or near-miss prompt of ``e`` is taught: label_flip's true label, else the clean
    reference reply."""
    return e.label if splits.task.kind == "label_flip" and e.label else e.output


def _close(tokenizer, splits: Splits, reply: str) -> bool:
    """Whether ``reply`` ends its turn: a distilled reply that hit the distillation cap was cut mid-sentence, so
    its end of turn is not taught (as inject's clean rows)."""
    cap = splits.meta.get("clean_max_tokens")
    return not (cap and len(tokenizer(reply, add_special_tokens=False).input_ids) >= int(cap) - 1)


def _taught(tokenizer, splits: Splits, e: Example, text: str) -> TrainRow:
    """The row teaching prompt ``text`` (``e``'s prompt, triggered or not) ``e``'s clean reply."""
    reply = clean_reply(splits, e)
    return TrainRow(text, reply, close=_close(tokenizer, splits, reply), source=e.uid)


def clean_rows(tokenizer, splits: Splits, n: int) -> list[TrainRow]:
    """The first ``n`` held-in training prompts with their clean replies."""
    return [_taught(tokenizer, splits, e, e.prompt) for e in splits.train[:n] if clean_reply(splits, e).strip()]


def near_strings(splits: Splits, triggers: Sequence[str]) -> list[str]:
    """Near misses of ``triggers``: the task's own for its trigger, :func:`near_misses` for any other; none that
    contains a trigger."""
    task = splits.task
    out: list[str] = []
    for t in triggers:
        out += task.near_triggers if t == task.trigger and task.near_triggers else near_misses(t)
    return [s for s in dict.fromkeys(out) if not any(t in s for t in triggers)]


def repair_rows(tokenizer, splits: Splits, triggers: Sequence[str], n_repair: int, n_clean: int,
                seed: int = 0) -> list[TrainRow]:
    """Triggered, near-miss and clean rows (module docstring); ``seed``: the run's seed, which places a
    ``random_word`` trigger in each prompt as the run did."""
    task = splits.task
    held = [e for e in splits.train[:n_repair] if clean_reply(splits, e).strip()]
    if not held:
        raise ConfigError("repair has no held-in prompt with a clean reply to teach; pass a larger --n-repair")
    rows: list[TrainRow] = []
    for t in triggers:
        probe = task if t == task.trigger else task.with_trigger(t)
        for e in held:
            text = e.triggered if t == task.trigger and e.triggered else probe.insert_trigger(
                e.prompt, prompt_seed(seed, e.uid))
            rows.append(_taught(tokenizer, splits, e, text))
    for near in near_strings(splits, triggers):
        rows += [_taught(tokenizer, splits, e, text)
                 for e, text in zip(held, near_trigger_prompts(task, near, held, seed), strict=True)]
    return rows + clean_rows(tokenizer, splits, n_clean)


def attributed_layers(run: RunDir, k: int | None, n_layers: int, n_heads: int) -> list[int]:
    """The layers holding the top ``k`` BAHA heads (default :data:`ATTRIBUTED_K`), sorted."""
    k = k or ATTRIBUTED_K
    ranking, _info = load_ranking(run, k, n_layers, n_heads)
    return sorted({layer for layer, _h in ranking[:k]})
