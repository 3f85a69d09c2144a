"""Teacher-forced target scores: how strongly the model predicts the backdoor target ``y`` after a prompt ``x``.

The target is the assistant reply followed by its end-of-turn token(s) (:func:`bkdattr.core.prompts.target_ids`),
``y = (y_1, ..., y_T)``; its teacher-forced log-probabilities ``log p(y_t | x, y_<t)`` come from
:mod:`bkdattr.core.scoring`. Three scores are computed from them (docs/METHOD.md section 3):

* ``geomean_prob`` -- ``P(y|x) = exp(mean_t log p(y_t | x, y_<t))``, the paper's score (a geometric mean);
* ``first_token_logprob`` -- ``log p(y_1 | x)``, the log-probability of the first target token;
* ``sum_logprob`` -- ``sum_t log p(y_t | x, y_<t)``.

A head's causal indirect effect (CIE) is the difference of a score between the patched and the clean run.

Two batch layouts are used. :func:`bkdattr.core.prompts.encode_with_targets` (right padding) feeds the literal
reference passes; :func:`encode_aligned` left-pads the prompts and right-pads the targets, so the last
prompt position ``p(x)`` is the same column ``W-1`` in every row and the target starts at column ``W`` --
the layout the fast exact path needs (one shared prefix ``[0, W-1)`` and one shared suffix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError, DataError
from ..core.prompts import PromptBatch, encode_prompts, pad_id, pad_sequences, position_ids_from_mask, target_ids
from ..core.scoring import batched_target_logprobs

#: every score computed, in a fixed order
METRICS: tuple[str, ...] = ("geomean_prob", "first_token_logprob", "sum_logprob")
#: the default ranking metric (see docs: the first-token log-probability separates heads far better on the
#: embedded model, where the later target tokens are near-certain once the first one is produced)
DEFAULT_METRIC = "first_token_logprob"


def check_metric(metric: str) -> str:
    """Return ``metric`` if known, else raise :class:`ConfigError`."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")
    return metric


def metrics_from_logprobs(lp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores from target log-probs ``lp [B, T]`` (column 0 is the first target token) and a validity mask
    ``mask [B, T]``. Returns ``{metric: [B]}`` float32. With ``T == 1`` only the first-token score is exact
    for longer targets, so callers pass the full target unless they ask for that metric alone."""
    lp = lp.float()
    m = mask.to(lp.device, torch.bool)
    total = torch.where(m, lp, torch.zeros_like(lp)).sum(1)
    n = m.sum(1).clamp(min=1).float()
    return {"geomean_prob": torch.exp(total / n), "first_token_logprob": lp[:, 0], "sum_logprob": total}


def cie_from_logprobs(lp_patched: torch.Tensor, lp_clean: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Score differences (patched - clean) from target log-probs ``[B, T]`` of both runs, computed from the
    per-token differences so that no large sums are subtracted (``sum_logprob`` is ~ -100 on random models,
    where one float32 ulp is 1e-5): ``{metric: [B]}`` float32."""
    m = mask.to(lp_patched.device, torch.bool)
    d = torch.where(m, lp_patched.float() - lp_clean.float().to(lp_patched.device), torch.zeros(()))
    dsum = d.sum(1)
    n = m.sum(1).clamp(min=1).float()
    clean = metrics_from_logprobs(lp_clean.to(lp_patched.device), m)
    return {"geomean_prob": clean["geomean_prob"] * torch.expm1(dsum / n), "first_token_logprob": d[:, 0],
            "sum_logprob": dsum}


@dataclass
class AlignedBatch:
    """Prompts left-padded to width ``W`` and targets right-padded to width ``T``: ``input_ids``,
    ``attention_mask``, ``position_ids`` ``[B, W+T]``; ``target_ids``/``target_mask`` ``[B, T]``. Column
    ``W-1`` is ``p(x)`` in every row; the logits there predict ``target_ids[:, 0]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    target_ids: torch.Tensor
    target_mask: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def target_width(self) -> int:
        return int(self.target_ids.shape[1])

    def truncate_targets(self, width: int) -> AlignedBatch:
        """The same batch with only the first ``width`` target columns."""
        w = self.prompt_width + width
        return AlignedBatch(self.input_ids[:, :w], self.attention_mask[:, :w], self.position_ids[:, :w],
                            self.prompt_width, self.target_ids[:, :width], self.target_mask[:, :width])


def encode_aligned(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> AlignedBatch:
    """Encode (prompt, target) pairs in the aligned layout (see the module docstring)."""
    if len(prompts) != len(targets):
        raise DataError(f"{len(prompts)} prompts but {len(targets)} targets; pass one target per prompt")
    pb: PromptBatch = encode_prompts(tokenizer, list(prompts), padding_side="left")
    tseqs = [target_ids(tokenizer, y) for y in targets]
    if any(len(t) == 0 for t in tseqs):
        raise DataError("a target encodes to no tokens; every prompt needs a non-empty target")
    tids, tmask = pad_sequences(tseqs, pad_id(tokenizer), "right")
    ids = torch.cat([pb.input_ids, tids], dim=1)
    mask = torch.cat([pb.attention_mask, tmask], dim=1)
    return AlignedBatch(ids, mask, position_ids_from_mask(mask), int(pb.input_ids.shape[1]), tids, tmask.bool())


def teacher_forced_scores(lm, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 8
                          ) -> dict[str, torch.Tensor]:
    """Clean scores of ``targets`` after ``prompts`` from plain forward passes: ``{metric: [N]}``."""
    out = [metrics_from_logprobs(lp, mask) for lp, mask in batched_target_logprobs(lm, prompts, targets, batch_size)]
    return {k: torch.cat([o[k] for o in out]) for k in METRICS}
