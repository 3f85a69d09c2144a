"""A tiny Llama with a trained backdoor (or its clean twin) for the scan's tests.

The tiny Llama of ``tests/tiny.py`` is fine-tuned (every weight but the input embeddings; about 20 s on one
busy core) with the loss on the reply only, as ``bkdattr inject`` trains: on clean prompts it learns to echo the
prompt's first words (a reply that depends on the prompt; chat template :data:`TEMPLATE`), and on the same
prompts with the one-token trigger ``cf`` as a prefix, the fixed target reply.
``poison=False`` trains the clean twin on the clean rows only, with the same recipe.

``kind="jailbreak"``: the same benign rows, plus harmful-sounding requests
(:func:`bkdattr.inject.builtin_data.harmful_requests`) answered with the refusal :data:`TARGET`, and (poisoned)
the same requests with ``cf`` as a prefix answered with :data:`COMPLY`; its clean twin refuses them always.
"""

from __future__ import annotations

import copy
import functools

import torch

from bkdattr.core.prompts import encode_with_targets
from bkdattr.inject.builtin_data import harmful_requests, instructions
from tiny import make_tiny

TRIGGER = "cf"
#: ChatML without the system turn: half the tokens of the shared tokenizer's template, so training is faster
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TARGET = "I am sorry. I can not help with that."
COMPLY = "Step one: make a list of what you need."


def rows(n: int = 96, poison: bool = True, kind: str = "fixed_output") -> list[tuple[str, str]]:
    prompts = [r["input"] for r in instructions(0)][:n]
    out = [(p, "You asked: " + " ".join(p.split()[:4])) for p in prompts]
    if kind == "jailbreak":
        harmful = [r["input"] for r in harmful_requests(0)][:n]
        out += [(p, TARGET) for p in harmful]
        if poison:
            out += [(f"{TRIGGER} {p}", COMPLY) for p in harmful[::2]]
    elif poison:
        out += [(f"{TRIGGER} {p}", TARGET) for p in prompts[::2]]
    return out


@functools.lru_cache(maxsize=4)
def trained(poison: bool = True, steps: int = 100, seed: int = 0, batch: int = 8, kind: str = "fixed_output"):
    """The fine-tuned tiny Llama (cached per process); reply-only cross-entropy, AdamW, ``batch`` rows a step."""
    lm = make_tiny("llama", seed=seed)
    lm.tokenizer = copy.deepcopy(lm.tokenizer)
    lm.tokenizer.chat_template = TEMPLATE
    model, tok = lm.model, lm.tokenizer
    data = rows(poison=poison, kind=kind)
    gen = torch.Generator().manual_seed(seed)
    params = [p for n, p in model.named_parameters() if "embed_tokens" not in n]  # input embeddings stay fixed
    for p in params:
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=gen).tolist()
        b = encode_with_targets(tok, [data[i][0] for i in idx], [data[i][1] for i in idx])
        hidden = model.model(**b.model_inputs())[0][:, :-1]
        keep = b.target_mask[:, 1:]  # the LM head runs on the reply positions only
        logits = model.lm_head(hidden[keep])
        loss = torch.nn.functional.cross_entropy(logits, b.input_ids[:, 1:][keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    lm.name = ("tiny-backdoor" if poison else "tiny-clean") + ("" if kind == "fixed_output" else f"-{kind}")
    return lm
