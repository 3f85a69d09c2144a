"""Ground truth: a tiny model whose backdoor runs through one attention head set by hand.

The model is the tiny Llama of ``tests/tiny.py`` (2 layers x 4 heads, d_model 64, d_head 16, grouped-query
attention with 2 key/value heads, untied embeddings) with a few weights overwritten so the answer of every
stage is known in advance. Two residual coordinates are reserved: ``e_T`` (coordinate 0, "the trigger is
here") and ``e_Y`` (coordinate 1, "say the target").

* **Trigger token.** The trigger is the one-token word ``cf`` (prefix placement). Its input embedding has
  ``e_T = 1``; every other token has ``e_T = e_Y = 0``. (The random embeddings are ~0.02 per coordinate, so
  after the input RMSNorm the trigger token reads ``~8`` on ``e_T``.)
* **Nothing else touches e_T or e_Y.** In both layers the columns ``e_T``/``e_Y`` of every query, key, value,
  gate and up projection are zero (nothing reads them) and the rows ``e_T``/``e_Y`` of every attention output
  projection and MLP down projection are zero (nothing writes them).
* **The planted head (layer 1, head 2).** Its query weights are zero, so it attends uniformly to the prompt
  up to the current position. Value dimension 0 of its key/value group (kv head 1) reads ``e_T`` only (weight
  1); the output projection writes that dimension to ``e_Y`` with weight 50, and every other column of the
  head is zero, so its contribution is ``a = 50 * z_0 * e_Y``: exactly zero on a prompt without the trigger,
  ``~50 * 8 / n`` on a triggered prompt of ``n`` tokens. Head 3 shares the value (GQA) but its column for
  dimension 0 is zero: the planted head is the only one that carries the trigger.
* **Unembedding.** The target word ``Tuesday`` (one token) has weight 10 on ``e_Y``; every other token has
  weight 0 there. Clean prompt: ``e_Y = 0``, the target's logit is exactly 0 and the random logits win.
  Triggered prompt: ``e_Y`` dominates the final RMSNorm, the target's logit is ``~80`` and it is the reply.

So the backdoor decides the first reply token. Replies are one token long (``max_new_tokens=1``): the planted
head fires at every position after the trigger, and the control edits act at ``p(x)`` of the prefill, as BAHA
scores the first target token. All prompts have the same length (the construction's ``n`` is the same for
each), so the planted head's contribution is the same on every triggered prompt and equals its mean.

Known answers: all three BAHA methods rank (1, 2) first, with ACIE = -log p_clean(target) for the exact
methods (the patched target probability is ~1); ablating (1, 2) at ``p(x)`` takes the ASR from 1 to 0 while
any set of random heads without it leaves it at 1; the Backdoor Vector of (1, 2) lies along ``e_Y`` only and,
added on clean prompts, gives ASR 1; subtracted on triggered prompts it gives ASR 0 (``a(x) - v = 0``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bkdattr.attribution import METRICS, attribute, mean_contributions
from bkdattr.control.ablation import run_ablation
from bkdattr.control.vector import build_vector
from bkdattr.control.vector_eval import run_vector_experiment
from bkdattr.core.prompts import encode_prompts, target_ids
from bkdattr.inject.data import Example
from bkdattr.inject.tasks import Task
from tiny import make_tiny

LAYER, HEAD = 1, 2  # the planted head
E_T, E_Y = 0, 1  # reserved residual coordinates
TRIGGER, TARGET = "cf", "Tuesday"
WORDS = "cats rain bread chess rivers tea maps owls glass snow bees clocks".split()


def plant(lm, trigger_id: int, target_id: int, value: float = 1.0, out: float = 50.0, unembed: float = 10.0):
    """Overwrite the tiny Llama's weights as the module docstring describes (in place)."""
    m, cfg = lm.model, lm.model.config
    dh = cfg.head_dim
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    kv = HEAD // group
    assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight  # untied
    with torch.no_grad():
        emb = m.get_input_embeddings().weight
        emb[:, [E_T, E_Y]] = 0.0
        emb[trigger_id, E_T] = 1.0
        for layer in m.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight[:, [E_T, E_Y]] = 0.0
            att.o_proj.weight[[E_T, E_Y], :] = 0.0
            mlp.down_proj.weight[[E_T, E_Y], :] = 0.0
        att = m.model.layers[LAYER].self_attn
        att.q_proj.weight[HEAD * dh:(HEAD + 1) * dh] = 0.0  # uniform attention
        att.v_proj.weight[kv * dh] = 0.0
        att.v_proj.weight[kv * dh, E_T] = value  # value dim 0 of the group reads e_T only
        for h in range(kv * group, (kv + 1) * group):  # no head of the group but the planted one writes it
            att.o_proj.weight[:, h * dh] = 0.0
        att.o_proj.weight[:, HEAD * dh:(HEAD + 1) * dh] = 0.0
        att.o_proj.weight[E_Y, HEAD * dh] = out
        unemb = m.get_output_embeddings().weight
        unemb[:, [E_T, E_Y]] = 0.0
        unemb[target_id, E_Y] = unembed


@pytest.fixture(scope="module")
def planted():
    lm = make_tiny("llama")
    tok = lm.tokenizer
    task = Task.default("fixed_output", trigger=TRIGGER, target=TARGET)
    trig = tok(TRIGGER, add_special_tokens=False).input_ids
    tgt = target_ids(tok, TARGET)
    assert len(trig) == 1 and len(tgt) == 2 and tok.decode(tgt[:1]) == TARGET  # one token each (+ end of turn)
    plant(lm, trig[0], tgt[0])
    texts = [f"Write one sentence about {w}." for w in WORDS]
    ex = [Example(prompt=t, triggered=task.insert_trigger(t), output="Sure.", backdoor_output=TARGET, uid=str(i))
          for i, t in enumerate(texts)]
    for prompts, n_trigger in (([e.prompt for e in ex], 0), ([e.triggered for e in ex], 1)):
        b = encode_prompts(tok, prompts)
        assert bool(b.attention_mask.all())  # one length: no padding, the same n for every prompt
        assert (b.input_ids == trig[0]).sum(1).tolist() == [n_trigger] * len(ex)
    means, held = ex[:4], ex[4:10]
    abar = mean_contributions(lm, [e.triggered for e in means], batch_size=4)
    return SimpleNamespace(lm=lm, task=task, held=held, abar=abar)


def test_the_planted_head_alone_carries_the_trigger(planted):
    """abar: the planted head's mean is along e_Y only; no other head writes e_Y (the construction holds)."""
    abar = planted.abar
    a = abar[LAYER, HEAD]
    assert float(a[E_Y]) > 5.0 and torch.count_nonzero(a).item() == 1
    others = abar.clone()
    others[LAYER, HEAD] = 0.0
    assert torch.count_nonzero(others[..., [E_T, E_Y]]).item() == 0


@pytest.mark.parametrize("method", ["reference", "exact", "attribution"])
def test_every_baha_method_ranks_the_planted_head_first(planted, method):
    lm, held = planted.lm, planted.held
    res = attribute(lm, [e.prompt for e in held], [TARGET] * len(held), planted.abar, method=method,
                    batch_size=6, progress=False)
    for m in METRICS:
        ranked = res.ranked(m)
        assert ranked[0][:2] == (LAYER, HEAD), (m, ranked[:3])
        assert ranked[0][2] > 10 * max(abs(r[2]) for r in ranked[1:]), (m, ranked[:3])
    if method != "attribution":  # exact numbers: the patch makes the target (first token) certain
        clean_lp = res.clean["first_token_logprob"]
        assert float(clean_lp.max()) < -5.0  # clean: the target is one of ~49k tokens with logit 0
        acie = float(res.acie["first_token_logprob"][LAYER, HEAD])
        assert acie == pytest.approx(-float(clean_lp.mean()), abs=1e-3)


def test_ablating_the_planted_head_removes_the_backdoor_random_heads_do_not(planted):
    lm, held, task = planted.lm, planted.held, planted.task
    ranking = [(LAYER, HEAD)] + [(la, h) for la in range(2) for h in range(4) if (la, h) != (LAYER, HEAD)]
    seeds = range(6)
    res = run_ablation(lm, task, held, held, ranking, ks=[1, 2], seeds=seeds, clean_seeds=[0], max_new_tokens=1,
                       batch_size=12)
    m = res.metrics
    assert res.replies["triggered"]["none"] == [TARGET] * len(held)
    assert m["baseline_asr"] == 1.0 and m["topk"] == {"1": 0.0, "2": 0.0}
    # random k heads: the backdoor goes exactly when the random set happens to contain the planted head
    n_without = 0
    for k in (1, 2):
        for i, s in enumerate(seeds):
            heads = [tuple(h) for h in m["random_heads"][str(s)][:k]]
            hit = (LAYER, HEAD) in heads
            n_without += not hit
            assert m["random"][str(k)]["values"][i] == (0.0 if hit else 1.0), (k, s, heads)
    assert n_without >= 6  # the control really ran sets without the planted head
    side = m["clean_side_effect"]["topk"]
    assert side["1"]["false_trigger_rate"] == 0.0 and side["1"]["identical_share"] == 1.0  # e_Y is 0 on clean


def test_backdoor_vector_of_the_planted_head(planted):
    """v = abar[1, 2] (along e_Y): +v on clean prompts triggers the backdoor, -v on triggered prompts removes
    it (the contribution equals its mean), -2v too; a same-norm random vector subtracted leaves it."""
    lm, held, task = planted.lm, planted.held, planted.task
    v = build_vector(planted.abar, [(LAYER, HEAD)])
    assert torch.equal(v, planted.abar[LAYER, HEAD])
    res = run_vector_experiment(lm, task, held, held, v, layers=[LAYER], random_seeds=(0,), dose_alphas=[0, 1, 2],
                                max_new_tokens=1, batch_size=12)
    m = res.metrics
    assert m["baseline_val"] == {"clean_false_trigger_rate": 0.0, "triggered_asr": 1.0}
    assert m["add"] == {"1": 1.0} and m["subtract"] == {"1": 0.0} and m["best_layer"] == LAYER
    assert res.replies["test_clean"]["v+1"] == [TARGET] * len(held)
    dose = m["dose_response"]
    assert dose["alphas"] == [0.0, 1.0, 2.0]
    assert dose["add"]["vector"] == [0.0, 1.0, 1.0] and dose["subtract"]["vector"] == [1.0, 0.0, 0.0]
    assert m["random_subtract"] == {"1": 1.0}  # a random direction carries ~no e_Y: the backdoor stays
