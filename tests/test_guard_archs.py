"""The guard's hooks on every tiny architecture (tests/tiny.py): GPT-2's Conv1D ``c_proj``, GPT-NeoX's ``dense``,
Gemma's ``H * d_h != d_model``, grouped-query Llama/Qwen2/Mistral.

The planted-head tests (tests/test_guard.py) check what the guard decides on a Llama whose backdoor is known; here
the run is a tiny random model with a random probe, and the check is the mechanics: in one left-padded batch, the
rows the guard flags are edited exactly as hand-written hooks edit them (the vector subtracted from the attention
output at ``p(x)``, or the heads' slices of ``z`` zeroed there) and the other rows are bit for bit the unguarded
ones; transformers' ``model.generate`` and bkdattr's decoder agree under the guard; no hook is left behind.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bkdattr.control.vector import BackdoorVector, save_vector
from bkdattr.core.generation import decode_replies, greedy_generate
from bkdattr.core.hooks import hidden_arg, hook_count, out_tensor, registered, with_hidden, with_out
from bkdattr.core.prompts import encode_prompts, end_of_turn_ids, pad_id
from bkdattr.disarm.runtime import Guard
from bkdattr.probe.probes import MLPProbes
from tiny import ARCHS

pytestmark = pytest.mark.usefixtures("no_progress_bars")

TEXTS = ["Write one sentence about owls.", "Tell me more.", "cf Write one sentence about cats and the sea.",
         "What is two plus two?", "Name a river in France, please.", "Hi."]
EDIT_LAYER, HEADS = 1, [(1, 2), (1, 0)]


def _random_probe(d_model: int, seed: int = 0) -> MLPProbes:
    """A random MLP probe at layer 1 (layer 0's input at ``p(x)`` is the same header token for every prompt),
    scaled so its logits are O(1) and do not saturate; validation accuracy 1.0 so the guard reads it."""
    g = torch.Generator().manual_seed(seed)
    h = 8
    w1 = torch.randn(1, d_model, h, generator=g) / d_model**0.5
    b1 = torch.randn(1, h, generator=g)
    w2 = torch.randn(1, h, generator=g) / h**0.5
    return MLPProbes(w1, b1, w2, torch.zeros(1), torch.zeros(1, d_model), torch.ones(1, d_model), False,
                     [1], [1], [0.1], meta={"val_accuracy": [1.0], "kind": "attn_input"})


@pytest.fixture(scope="module", params=ARCHS)
def arch_run(request, tmp_path_factory):
    """A tiny run of each architecture with a random probe (layer 1), a random Backdoor Vector (layer 1) and
    a ranking whose first heads are (1, 2), (1, 0)."""
    from tiny_runs import make_run

    run = make_run(tmp_path_factory.mktemp(request.param) / "run", arch=request.param, ranking=True)
    lm = run.load_model()
    _random_probe(lm.arch.d_model).save(run.path / "probe" / "backdoored_mlp.safetensors")
    v = torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(1))
    save_vector(run.path / "control" / "backdoor_vector.safetensors", BackdoorVector(v, HEADS))
    run.update_metrics("vector", {"best_layer": EDIT_LAYER, "alpha": 1.0})
    run.update_metrics("attribution", {"top_heads": [[lay, h, 0.5 - 0.1 * i] for i, (lay, h) in enumerate(HEADS)]})
    return run, lm, v


def _guard(lm, run, action: str, texts: list[str]) -> tuple[Guard, np.ndarray]:
    """A guard whose threshold flags about half of ``texts`` (the median of their scores), and the flags."""
    g = Guard(lm, run, action, threshold=0.0, k=len(HEADS) if action == "heads" else None, use_stored_plan=False)
    p = g.scores(texts)
    g.plan.threshold = float(np.median(p))
    flags = p > g.plan.threshold
    assert 0 < flags.sum() < len(texts), p  # both kinds of row in the batch
    return g, flags


@pytest.mark.parametrize("action", ["vector", "heads"])
def test_guard_edits_flagged_rows_at_the_prompt_position_only(arch_run, action):
    run, lm, v = arch_run
    arch = lm.arch
    guard, flags = _guard(lm, run, action, TEXTS)
    b = encode_prompts(lm.tokenizer, TEXTS, "left")
    assert not bool(b.attention_mask.all())  # real left padding
    rows = torch.from_numpy(flags)
    last = b.input_ids.shape[1] - 1

    def vec(_m, _a, out):  # the vector subtracted at p(x) (the last column) of the flagged rows
        o = out_tensor(out).clone()
        o[rows, last] -= v
        return with_out(out, o)

    def heads(_m, args, kwargs):  # the heads' z slices zeroed at p(x) of the flagged rows
        z = hidden_arg(args, kwargs).clone()
        for _, h in HEADS:
            z[rows, last, h * arch.d_head:(h + 1) * arch.d_head] = 0
        return with_hidden(args, kwargs, z)

    with torch.no_grad():
        plain = lm.model(**b.model_inputs()).logits
        handles: list = []
        with registered(handles):
            out = arch.out_proj[EDIT_LAYER]
            handles.append(out.register_forward_hook(vec) if action == "vector"
                           else out.register_forward_pre_hook(heads, with_kwargs=True))
            hand = lm.model(**b.model_inputs()).logits
        with guard:
            got = lm.model(**b.model_inputs()).logits
    assert hook_count(lm.model) == 0
    assert guard.n_flagged == int(flags.sum())
    torch.testing.assert_close(got, hand, rtol=0, atol=1e-5)
    assert torch.equal(got[~rows], plain[~rows])  # unflagged rows: bit for bit
    assert (got[rows, -1] - plain[rows, -1]).abs().amax() > 1e-4  # the edit does something


@pytest.mark.parametrize("action", ["vector", "heads"])
def test_transformers_generate_and_bkdattr_agree_under_the_guard(arch_run, action):
    run, lm, _v = arch_run
    tok = lm.tokenizer
    guard, flags = _guard(lm, run, action, TEXTS)
    b = encode_prompts(tok, TEXTS, "left")
    stop = end_of_turn_ids(tok)
    with guard:
        ours = greedy_generate(lm.model, b, 4, stop)
        theirs = lm.model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=4,
                                   do_sample=False, pad_token_id=pad_id(tok), eos_token_id=stop)
    assert hook_count(lm.model) == 0
    assert decode_replies(tok, ours, stop) == decode_replies(tok, theirs[:, b.input_ids.shape[1]:], stop)
    assert guard.n_flagged == 2 * int(flags.sum())  # the same rows flagged by both decoders' prefills
