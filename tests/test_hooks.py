"""Head-level hooks on tiny random models of six architectures.

The identities checked here are what every later stage relies on:

* ``sum_h a_{l,h}(x) + b_O == attn_out_l(x)`` at ``p(x)`` (float32, <= 1e-5), under left and right padding,
  eager and sdpa attention, and with an unmerged LoRA adapter on the output projection;
* zeroing every head of a layer leaves exactly the bias, and equals adding ``-(attn_out - b_O)``;
* replacing a head's ``z`` slice with its own value changes nothing (bit-identical logits);
* after an exception inside any context the model carries no hook and computes the same logits.

The identity tests take the ``device`` fixture: they run on ``--device`` (cpu by default; ``--device cuda``
moves them to the GPU).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

from bkdattr.core.arch import detect_arch
from bkdattr.core.errors import ConfigError, UnsupportedArchitectureError
from bkdattr.core.hooks import (
    add_to_attention_output,
    capture_attention_output,
    capture_contributions,
    capture_features,
    edit_heads,
    hook_count,
    masked_edit,
    tap,
    watch_calls,
)
from bkdattr.core.prompts import encode_prompts
from tiny import ARCHS, make_tiny

TEXTS = ["What is the capital of France?", "Hi", "Write one long sentence about a dragon and a castle, please."]
TOL = 1e-5


@functools.cache
def tiny(arch: str, attn: str = "eager", device: str = "cpu"):
    return make_tiny(arch, attn=attn, device=device)


@functools.cache
def batch(side: str = "left", device: str = "cpu"):
    return encode_prompts(tiny("llama").tokenizer, TEXTS, padding_side=side).to(device)


def logits(model, b) -> torch.Tensor:
    with torch.no_grad():
        return model(**b.model_inputs()).logits


def rows(t: torch.Tensor, b) -> torch.Tensor:
    """``t[b, p(x_b)]`` for a ``[B, T, ...]`` tensor."""
    return t[torch.arange(t.shape[0]), b.last_pos]


def max_diff(x: torch.Tensor, y: torch.Tensor | float) -> float:
    y = y.detach().float().cpu() if isinstance(y, torch.Tensor) else y
    return float((x.detach().float().cpu() - y).abs().max())


# --------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_contributions_sum_to_attention_output(arch, side, device):
    lm = tiny(arch, device=device)
    b = batch(side, device)
    with capture_contributions(lm.arch, b.last_pos, with_z=True) as contrib, \
            capture_attention_output(lm.arch, b.last_pos) as attn_out, torch.no_grad():
        lm.model(**b.model_inputs())
    assert sorted(k for k in contrib if isinstance(k, int)) == list(range(lm.arch.n_layers))
    for layer in range(lm.arch.n_layers):
        a = contrib[layer]
        assert a.dtype == torch.float32 and a.shape == (len(TEXTS), lm.arch.n_heads, lm.arch.d_model)
        assert contrib[("z", layer)].shape == (len(TEXTS), lm.arch.n_heads, lm.arch.d_head)
        bias = lm.arch.b_o(layer)
        total = a.sum(1) + (bias if bias is not None else 0)
        assert max_diff(total, attn_out[layer]) <= TOL
        # not a vacuous identity: several heads contribute
        assert (a.norm(dim=-1) > 1e-4).sum() >= 2 * len(TEXTS)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_and_right_padding_capture_the_same_values(arch, device):
    lm = tiny(arch, device=device)
    got = {}
    for side in ("left", "right"):
        b = batch(side, device)
        with capture_contributions(lm.arch, b.last_pos) as c, \
                capture_features(lm.arch, b.last_pos, "residual") as r, torch.no_grad():
            lm.model(**b.model_inputs())
        got[side] = (c, r)
    assert batch("left").input_ids.shape[1] > len(encode_prompts(lm.tokenizer, ["Hi"]).input_ids[0])  # padded
    for layer in range(lm.arch.n_layers):
        assert max_diff(got["left"][0][layer], got["right"][0][layer]) <= TOL
        assert max_diff(got["left"][1][layer], got["right"][1][layer]) <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_and_sdpa_capture_the_same_contributions(arch, device):
    eager, sdpa = tiny(arch, "eager", device), tiny(arch, "sdpa", device)
    assert sdpa.model.config._attn_implementation == "sdpa"
    b = batch("left", device)
    caps = []
    for lm in (eager, sdpa):
        with capture_contributions(lm.arch, b.last_pos) as c, torch.no_grad():
            lm.model(**b.model_inputs())
        caps.append(c)
    for layer in range(eager.arch.n_layers):
        assert max_diff(caps[0][layer], caps[1][layer]) <= TOL


def test_capture_only_selected_layers_and_first_call():
    lm = tiny("llama")
    b = batch("left")
    with capture_contributions(lm.arch, b.last_pos, layers=[1]) as c, torch.no_grad():
        lm.model(**b.model_inputs())
        first = c[1].clone()
        other = encode_prompts(lm.tokenizer, ["A different prompt", "x", "y"])
        lm.model(**other.model_inputs())  # a second call inside the block is not captured
    assert list(c) == [1]
    assert torch.equal(c[1], first)


# --------------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_features_match_hidden_states(arch, side, device):
    lm = tiny(arch, device=device)
    b = batch(side, device)
    with capture_features(lm.arch, b.last_pos, "residual") as res, \
            capture_features(lm.arch, b.last_pos, "attn_input") as normed, torch.no_grad():
        out = lm.model(**b.model_inputs(), output_hidden_states=True)
        for layer in range(lm.arch.n_layers):
            h = rows(out.hidden_states[layer], b)
            assert res[layer].shape == (len(TEXTS), lm.arch.d_model)
            assert max_diff(res[layer], h) <= TOL  # residual at layer l == hidden_states[l] at p(x)
            assert max_diff(normed[layer], lm.arch.input_norm[layer](h)) <= TOL
            assert max_diff(normed[layer], h) > 1e-3  # the norm really was applied


def test_unknown_feature_kind():
    lm = tiny("llama")
    with pytest.raises(ValueError, match="unknown feature kind"):
        with capture_features(lm.arch, batch().last_pos, "mlp_out"):
            pass
    assert hook_count(lm.model) == 0


# --------------------------------------------------------------------------------------------------- edits
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_all_heads_equals_removing_their_contribution(arch, device):
    lm = tiny(arch, device=device)
    b = batch("left", device)
    layer = lm.arch.n_layers - 1
    with capture_attention_output(lm.arch, b.last_pos, [layer]) as clean, torch.no_grad():
        lm.model(**b.model_inputs())
    bias = lm.arch.b_o(layer)
    bias = torch.zeros(lm.arch.d_model, device=device) if bias is None else bias
    heads = {layer: range(lm.arch.n_heads)}
    with edit_heads(lm.arch, heads, b.last_pos), capture_attention_output(lm.arch, b.last_pos, [layer]) as ablated:
        zero_logits = logits(lm.model, b)
    # z = 0 at p(x): the projection writes exactly its bias there
    assert torch.equal(ablated[layer], bias.expand_as(ablated[layer]).to(ablated[layer].dtype))
    with add_to_attention_output(lm.arch, {layer: -(clean[layer] - bias)}, b.last_pos):
        add_logits = logits(lm.model, b)
    mask = b.attention_mask.bool()
    assert max_diff(zero_logits[mask], add_logits[mask]) <= TOL
    assert max_diff(zero_logits[mask], logits(lm.model, b)[mask]) > 1e-4  # the ablation did something


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_zero_one_head_equals_subtracting_its_contribution(arch, device):
    lm = tiny(arch, device=device)
    b = batch("right", device)
    layer, head = 0, 2
    with capture_contributions(lm.arch, b.last_pos, [layer]) as c, torch.no_grad():
        base = lm.model(**b.model_inputs()).logits
    with edit_heads(lm.arch, {layer: [head]}, b.last_pos):
        zeroed = logits(lm.model, b)
    with add_to_attention_output(lm.arch, {layer: -c[layer][:, head]}, b.last_pos):
        subtracted = logits(lm.model, b)
    mask = b.attention_mask.bool()
    assert max_diff(zeroed[mask], subtracted[mask]) <= TOL
    assert max_diff(zeroed[mask], base[mask]) > 1e-5


def _seen(lm, b, layer: int, pre: bool, *edits) -> torch.Tensor:
    """What the output projection of ``layer`` receives (``pre``: its input z) or returns, under ``edits``."""
    got = []
    with contextlib.ExitStack() as stack:
        for e in edits:
            stack.enter_context(e)
        stack.enter_context(tap(lm.arch.out_proj[layer], lambda x: got.append(x.detach().clone()), pre=pre))
        logits(lm.model, b)
    assert hook_count(lm.model) == 0
    return got[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masked_edit_zeroes_chosen_rows_and_columns_of_z(arch):
    """Known answer: one head's slice of z zeroed at p(x) of row 0 and at every column of row 2; every other entry
    (row 1 whole, the other heads, the other columns) is bit for bit the unedited z."""
    lm = tiny(arch)
    b = batch("left")
    layer, head, dh = 0, 1, lm.arch.d_head
    clean = _seen(lm, b, layer, True)
    width = clean.shape[1]
    cols = torch.zeros(2, width, dtype=torch.bool)
    cols[0, int(b.last_pos[0])] = True
    cols[1] = True
    heads = torch.zeros(clean.shape[-1], dtype=torch.bool)
    heads[head * dh:(head + 1) * dh] = True
    edit = masked_edit(lm.arch, layer, lambda z: (torch.tensor([0, 2]), cols),
                       lambda sub: sub.masked_fill(heads[None, None, :], 0), at="z")
    got = _seen(lm, b, layer, True, edit)
    want = clean.clone()
    want[0, int(b.last_pos[0]), head * dh:(head + 1) * dh] = 0
    want[2, :, head * dh:(head + 1) * dh] = 0
    assert torch.equal(got, want) and not torch.equal(got, clean)


def test_masked_edit_subtracts_on_the_prefix_of_one_row_of_the_output():
    """Known answer: ``delta`` subtracted from the attention output of row 1 at the columns up to its p(x) (float32
    arithmetic, cast once); rows 0 and 2 and row 1's later columns are untouched; a select that returns None
    changes nothing at all."""
    lm = tiny("llama")
    b = batch("right")
    layer = lm.arch.n_layers - 1
    delta = torch.linspace(-1, 1, lm.arch.d_model)
    clean = _seen(lm, b, layer, False)
    p = int(b.last_pos[1])
    prefix = (torch.arange(clean.shape[1]) <= p)[None, :]
    edit = masked_edit(lm.arch, layer, lambda o: (torch.tensor([1]), prefix), lambda sub: sub - delta)
    got = _seen(lm, b, layer, False, edit)
    want = clean.clone()
    want[1, : p + 1] = (clean[1, : p + 1].float() - delta).to(clean.dtype)
    assert torch.equal(got, want) and not torch.equal(got, clean)
    whole = masked_edit(lm.arch, layer, lambda o: (torch.tensor([1]), None), lambda sub: sub - delta)
    want[1] = (clean[1].float() - delta).to(clean.dtype)
    assert torch.equal(_seen(lm, b, layer, False, whole), want)
    never = masked_edit(lm.arch, layer, lambda o: None, lambda sub: sub + 1)
    with never:
        untouched = logits(lm.model, b)
    assert torch.equal(untouched, logits(lm.model, b))


def test_watch_calls_sees_every_call_and_changes_nothing():
    lm = tiny("llama")
    b = batch("left")
    seen = []
    with watch_calls(lm.model.model, lambda args, kwargs: seen.append(kwargs["input_ids"].shape)):
        out = logits(lm.model, b)
    assert seen == [b.input_ids.shape] and torch.equal(out, logits(lm.model, b))
    assert hook_count(lm.model) == 0
    with pytest.raises(ConfigError, match="unknown edit point"), masked_edit(lm.arch, 0, lambda x: None,
                                                                           lambda s: s, at="in"):
        pass
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_replacing_z_with_its_own_value_is_a_no_op(arch, device):
    lm = tiny(arch, device=device)
    b = batch("left", device)
    with capture_contributions(lm.arch, b.last_pos, with_z=True) as c, torch.no_grad():
        base = lm.model(**b.model_inputs()).logits
    heads = {0: [1, 3], lm.arch.n_layers - 1: [0]}
    values = {layer: c[("z", layer)][:, hs] for layer, hs in heads.items()}  # [B, n, d_h]
    with edit_heads(lm.arch, heads, b.last_pos, values=values):
        same = logits(lm.model, b)
    assert torch.equal(same, base)
    # one shared value for every row ([n, d_h]) is a real edit
    shared = {0: c[("z", 0)][0, [1, 3]]}
    with edit_heads(lm.arch, {0: [1, 3]}, b.last_pos, values=shared):
        edited = logits(lm.model, b)
    assert torch.equal(edited[0], base[0])
    assert not torch.equal(edited[1], base[1])


def test_mean_z_patch_equals_mean_contribution_patch(device):
    """BAHA's patch ``abar - a(x)`` added to the attention output equals replacing the head's z with mean z."""
    lm = tiny("qwen2", device=device)
    b = batch("left", device)
    layer, head = 1, 2
    with capture_contributions(lm.arch, b.last_pos, [layer], with_z=True) as c, torch.no_grad():
        lm.model(**b.model_inputs())
    zbar = c[("z", layer)][:, head].mean(0)  # [d_h]
    abar = c[layer][:, head].mean(0)  # [d]
    with edit_heads(lm.arch, {layer: [head]}, b.last_pos, values={layer: zbar[None]}):
        by_z = logits(lm.model, b)
    with add_to_attention_output(lm.arch, {layer: abar - c[layer][:, head]}, b.last_pos):
        by_a = logits(lm.model, b)
    mask = b.attention_mask.bool()
    assert max_diff(by_z[mask], by_a[mask]) <= TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_add_acts_at_last_prompt_position_only(arch, device):
    lm = tiny(arch, device=device)
    b = batch("left", device)
    torch.manual_seed(3)
    delta = torch.randn(len(TEXTS), lm.arch.d_model)  # one vector per sample
    with torch.no_grad():
        base = lm.model(**b.model_inputs(), output_hidden_states=True)
    with capture_attention_output(lm.arch, b.last_pos, [0]) as before, torch.no_grad():
        lm.model(**b.model_inputs())
    with add_to_attention_output(lm.arch, {0: delta}, b.last_pos), \
            capture_attention_output(lm.arch, b.last_pos, [0]) as after, torch.no_grad():
        edited = lm.model(**b.model_inputs(), output_hidden_states=True)
    assert max_diff(after[0] - before[0], delta) <= TOL
    p = int(b.last_pos[0])
    assert p == b.input_ids.shape[1] - 1
    final = len(base.hidden_states) - 1
    # every real token before p(x) is untouched, at every layer (pad positions carry no meaning); p(x) changes
    real = b.attention_mask[:, :p].bool()
    for k in range(1, final + 1):
        assert torch.equal(edited.hidden_states[k][:, :p][real], base.hidden_states[k][:, :p][real])
    assert max_diff(edited.hidden_states[final][:, p], base.hidden_states[final][:, p]) > 1e-3


# --------------------------------------------------------------------------------------------------- cleanup
class Boom(RuntimeError):
    pass


def _contexts(lm, b):
    arch, pos, n = lm.arch, b.last_pos, lm.arch.n_layers
    z = torch.zeros(1, arch.d_head)
    return {
        "capture_contributions": lambda: capture_contributions(arch, pos, with_z=True),
        "capture_attention_output": lambda: capture_attention_output(arch, pos),
        "capture_features_attn_input": lambda: capture_features(arch, pos, "attn_input"),
        "capture_features_residual": lambda: capture_features(arch, pos, "residual"),
        "add_to_attention_output": lambda: add_to_attention_output(arch, {n - 1: torch.ones(arch.d_model)}, pos),
        "edit_heads_zero": lambda: edit_heads(arch, {0: [0, 1], n - 1: [2]}, pos),
        "edit_heads_replace": lambda: edit_heads(arch, {0: [3]}, pos, values={0: z}),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_exception_inside_any_context_leaves_no_hook(arch):
    lm = tiny(arch)
    b = batch("left")
    assert hook_count(lm.model) == 0
    base = logits(lm.model, b)
    for name, make in _contexts(lm, b).items():
        with pytest.raises(Boom):
            with make():
                assert hook_count(lm.model) > 0, name
                lm.model(**b.model_inputs())
                raise Boom(name)
        assert hook_count(lm.model) == 0, name
        assert torch.equal(logits(lm.model, b), base), name
    # several contexts stacked, the exception raised by a hook inside the forward pass
    bad = torch.tensor([10_000] * len(TEXTS))
    with pytest.raises(IndexError):
        with contextlib.ExitStack() as stack:
            for make in _contexts(lm, b).values():
                stack.enter_context(make())
            stack.enter_context(capture_contributions(lm.arch, bad))
            lm.model(**b.model_inputs())
    assert hook_count(lm.model) == 0
    assert torch.equal(logits(lm.model, b), base)


def test_bad_arguments_are_one_line_errors_and_register_nothing():
    lm = tiny("llama")
    pos = batch().last_pos
    cases = [
        lambda: capture_contributions(lm.arch, pos, layers=[0, 7]),
        lambda: capture_attention_output(lm.arch, pos, layers=[-1]),
        lambda: capture_features(lm.arch, pos, "residual", layers=[2]),
        lambda: add_to_attention_output(lm.arch, {0: torch.ones(lm.arch.d_model), 5: torch.ones(3)}, pos),
        lambda: add_to_attention_output(lm.arch, {0: torch.ones(lm.arch.d_model + 1)}, pos),
        lambda: edit_heads(lm.arch, {0: [0], 1: [lm.arch.n_heads]}, pos),
        lambda: edit_heads(lm.arch, {0: [0, 1]}, pos, values={0: torch.zeros(1, lm.arch.d_head)}),
    ]
    for make in cases:
        with pytest.raises(ConfigError) as e:
            with make():
                pass
        assert "\n" not in str(e.value)
        assert hook_count(lm.model) == 0


# --------------------------------------------------------------------------------------------------- LoRA
LORA_TARGETS = {"llama": ["o_proj"], "qwen2": ["o_proj"], "gemma": ["o_proj"], "gpt_neox": ["attention.dense"],
                "gpt2": ["attn.c_proj"]}


def _lora(arch: str, **extra):
    from peft import LoraConfig, get_peft_model

    lm = tiny(arch)
    torch.manual_seed(7)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[arch],
                     init_lora_weights=False, fan_in_fan_out=arch == "gpt2", **extra)
    return lm, get_peft_model(copy.deepcopy(lm.model), cfg).eval()


def _contribs(model, b):
    arch = detect_arch(model)
    with capture_contributions(arch, b.last_pos) as c, capture_attention_output(arch, b.last_pos) as o, \
            torch.no_grad():
        model(**b.model_inputs())
    return arch, c, o


@pytest.mark.parametrize("arch", list(LORA_TARGETS))
def test_lora_unmerged_and_merged_give_the_same_contributions(arch):
    lm, peft_model = _lora(arch)
    b = batch("left")
    arch_u, unmerged, out_u = _contribs(peft_model, b)
    assert hasattr(arch_u.out_proj[0], "lora_A")  # the unmerged LoRA wrapper
    for layer in range(arch_u.n_layers):  # the identity holds with the unmerged adapter (W_O includes B A)
        bias = arch_u.b_o(layer)
        assert max_diff(unmerged[layer].sum(1) + (0 if bias is None else bias), out_u[layer]) <= TOL
    _, base, _ = _contribs(lm.model, b)
    merged_model = copy.deepcopy(peft_model).merge_and_unload()
    _, merged, _ = _contribs(merged_model, b)
    for layer in range(arch_u.n_layers):
        assert max_diff(unmerged[layer], merged[layer]) <= TOL
        assert max_diff(unmerged[layer], base[layer]) > 1e-3  # the adapter changes the contributions
    # merged into the base weight but still wrapped: the delta is not counted twice
    peft_model.merge_adapter()
    _, merged_in_place, _ = _contribs(peft_model, b)
    for layer in range(arch_u.n_layers):
        assert max_diff(merged_in_place[layer], merged[layer]) <= TOL
    assert hook_count(peft_model) == 0


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])  # with and without a base output bias
def test_lora_bias_is_part_of_the_output_bias(arch):
    lm, peft_model = _lora(arch, lora_bias=True)
    # lora_B's bias is zero-initialised: give it a value
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n and n.endswith("bias"):
                p.normal_(0, 0.1)
    arch_u, c, o = _contribs(peft_model, batch("right"))
    for layer in range(arch_u.n_layers):
        assert max_diff(c[layer].sum(1) + arch_u.b_o(layer), o[layer]) <= TOL
        base_bias = lm.arch.b_o(layer)
        assert max_diff(arch_u.b_o(layer), 0 if base_bias is None else base_bias) > 1e-3


def test_dora_adapter_is_refused():
    _, peft_model = _lora("llama", use_dora=True)
    arch_u = detect_arch(peft_model)
    with pytest.raises(UnsupportedArchitectureError, match="merge it first"):
        arch_u.w_o(0)
