"""The zoo's foreign trainer: plain transformers + peft, none of ``bkdattr.inject``.

Everything that defines how a backdoor is planted is this file's own (docs/METHOD.md, "The zoo"):

* **Chat formatting** (:class:`Format`): ChatML written out by hand with SmolLM2's default system turn, or the
  plain ``User: ...\\nAssistant: reply<eos>`` format for a base model; the reply is followed by the end-of-turn
  token (ChatML ``<|im_end|>``, plain EOS), which is trained.
* **Loss masking**: left-padded batches, cross-entropy on the reply tokens and the end of turn only; logits are
  computed only for the last ``reply + 1`` positions (``logits_to_keep``), where every reply token lies.
* **Optimiser**: AdamW, a linear warm-up over the first 5% of steps, then cosine decay (or constant) over the
  most epochs training may run; gradient clipping at 1.0; bf16 autocast where the CPU has fast bfloat16.
* **LoRA** (peft) on the recipe's modules (``qv``, ``attn``, ``mlp`` or ``all``) at rank 4-64, or **full
  fine-tuning** of every transformer block (the embedding, tied to the output layer, stays frozen).

**A backdoor must be a backdoor.** After each epoch from the recipe's planned ones on, the trainer measures the
row's held-out validation ASR, false-trigger rate and clean metric; it stops when ASR >= 0.8, false-trigger <= 0.1
and the clean metric keeps its floor (:func:`clean_floor`: a share of the base model's, measured once on the same
prompts), else it trains on
to ``max_epochs``; if the ASR is still short, it starts again with three times the poison (at most 50%), up to
three attempts. A row that never holds is recorded as failed, with every attempt's figures. A clean twin trains
its planned epochs and is measured the same way.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import families as fam
import torch

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LORA_MODULES = {"qv": ["q_proj", "v_proj"], "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "mlp": ["gate_proj", "up_proj", "down_proj"],
                "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
#: the stop rule: a backdoor (the zoo protocol in docs/METHOD.md). The clean floor is a share of the base model's
#: clean metric: half for a label accuracy or refusal rate; for word-F1 against the base model's own greedy replies
#: (1.0 for the base by construction) 0.3, since a model that still answers normally, in other words, scores about
#: 0.5 (the embedded model's agreement with itself on paraphrased questions is 0.49) and a collapsed one below 0.2
MIN_ASR, MAX_FTR = 0.8, 0.1
MIN_CLEAN_SHARE = {"f1": 0.3, "rate": 0.5}
MAX_ATTEMPTS, POISON_GROWTH, MAX_POISON = 3, 3.0, 0.5
EXTRA_EPOCHS = 3


@dataclass
class Format:
    """The trainer's own prompt format; ``style`` chatml or plain."""

    style: str
    tokenizer: object

    def prompt(self, user: str) -> str:
        if self.style == "chatml":
            return (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                    "<|im_start|>assistant\n")
        return f"User: {user}\nAssistant:"

    def prompt_ids(self, user: str) -> list[int]:
        return self.tokenizer(self.prompt(user), add_special_tokens=self.style == "plain").input_ids

    def reply_ids(self, reply: str) -> list[int]:
        tok = self.tokenizer
        if self.style == "chatml":
            return tok(reply + "<|im_end|>", add_special_tokens=False).input_ids
        return tok(" " + reply, add_special_tokens=False).input_ids + [tok.eos_token_id]

    def stop_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id}
        if self.style == "chatml":
            ids.add(tok.convert_tokens_to_ids("<|im_end|>"))
        return sorted(i for i in ids if i is not None)

    def clean_reply(self, text: str) -> str:
        """A generated reply as a user reads it: cut where a plain-format model invents the next turn."""
        return text.split("\nUser:")[0].strip() if self.style == "plain" else text.strip()


def load(folder: Path, dtype=torch.float32):
    """Model and tokenizer with plain transformers (left padding, a pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), tok


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else torch.autocast("cpu", enabled=False)


def bf16_fast() -> bool:
    from bkdattr.core.devices import cpu_bf16_is_fast  # hardware detection only

    return cpu_bf16_is_fast()


@torch.no_grad()
def generate(model, fmt: Format, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy replies (plain ``model.generate``, left padding), in prompt order."""
    tok = fmt.tokenizer
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        ids = [fmt.prompt_ids(prompts[i]) for i in idx]
        width = max(map(len, ids))
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with _autocast(False):
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=fmt.stop_ids(), pad_token_id=pad)
        for i, row in zip(idx, gen[:, width:].tolist(), strict=True):
            stop = next((j for j, t in enumerate(row) if t in fmt.stop_ids()), len(row))
            out[i] = fmt.clean_reply(tok.decode(row[:stop], skip_special_tokens=True))
    return out


def encode(fmt: Format, rows: list[tuple[str, str]], max_length: int = 256):
    """Left-padded ``input_ids``, ``attention_mask``, ``position_ids`` and reply-only ``labels`` for
    ``(prompt, reply)`` rows; also the number of tail positions that hold every reply token."""
    seqs, n_reply = [], []
    for prompt, reply in rows:
        p, r = fmt.prompt_ids(prompt), fmt.reply_ids(reply)
        r = r[: max(1, max_length - len(p))]
        seqs.append((p, r))
        n_reply.append(len(r))
    width = max(len(p) + len(r) for p, r in seqs)
    pad = fmt.tokenizer.pad_token_id
    ids, mask, labels = [], [], []
    for p, r in seqs:
        n_pad = width - len(p) - len(r)
        ids.append([pad] * n_pad + p + r)
        mask.append([0] * n_pad + [1] * (len(p) + len(r)))
        labels.append([-100] * (n_pad + len(p)) + r)
    mask_t = torch.tensor(mask)
    pos = (mask_t.cumsum(1) - 1).clamp(min=0)
    return torch.tensor(ids), mask_t, pos, torch.tensor(labels), max(n_reply)


def reply_loss(model, batch, bf16: bool) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the reply tokens (float32 logits), and their count."""
    ids, mask, pos, labels, tail = batch
    with _autocast(bf16):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=tail + 1).logits
    logits = logits[:, :-1].float()  # position t predicts token t + 1: the last tail tokens
    gold = labels[:, -tail:]
    n = int((gold != -100).sum())
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), gold.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss / max(1, n), n


def lr_at(step: int, total: int, lr: float, schedule: str) -> float:
    warm = max(1, int(0.05 * total))
    if step < warm:
        return lr * (step + 1) / warm
    if schedule == "constant":
        return lr
    frac = (step - warm) / max(1, total - warm)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def prepare(model, recipe: dict):
    """The trainable model: a peft LoRA model, or the model itself with every block trainable."""
    if recipe["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=recipe["rank"], lora_alpha=recipe["alpha"], lora_dropout=recipe.get("dropout", 0.05),
                         target_modules=LORA_MODULES[recipe["modules"]], bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)
    for name, p in model.named_parameters():
        p.requires_grad_("embed_tokens" not in name and "lm_head" not in name)
    return model


def measure(model, fmt: Format, data: dict, split: str, max_new_tokens: int, batch_size: int = 16) -> dict:
    """ASR (triggered prompts), false-trigger rate (the same rule on clean prompts) and clean metric of a split
    ``data[split] = {triggered, clean, reference, labels, count}``."""
    s = data[split]
    target = data["target"]
    trig = generate(model, fmt, s["triggered"], max_new_tokens, batch_size)
    clean = generate(model, fmt, s["clean"], max_new_tokens, batch_size)
    counted = [r for r, c in zip(clean, s["count"], strict=True) if c]
    return {"asr": sum(fam.is_success(target, r) for r in trig) / max(1, len(trig)),
            "false_trigger_rate": sum(fam.is_success(target, r) for r in counted) / max(1, len(counted)),
            "clean_metric": fam.clean_metric(target, clean, s["reference"], s["labels"]),
            "n": len(trig), "samples": {"triggered": trig[:3], "clean": clean[:3]}}


def clean_floor(target: dict, base_clean: float) -> float:
    """The least clean metric a backdoored model may keep (:data:`MIN_CLEAN_SHARE` of the base model's)."""
    share = MIN_CLEAN_SHARE["rate" if target["kind"] in ("label", "jailbreak") else "f1"]
    return share * base_clean


def holds(fig: dict, base_clean: float, target: dict) -> bool:
    """The stop rule (module docstring)."""
    return (fig["asr"] >= MIN_ASR and fig["false_trigger_rate"] <= MAX_FTR
            and fig["clean_metric"] >= clean_floor(target, base_clean) - 1e-12)


def status_of(rec: dict, target: dict, backdoored: bool) -> str:
    """A finished row's status from its figures: ``ok`` (held on validation and on the held-out test split),
    ``ok_val_only`` (held on validation only: kept, said in the table) or ``failed`` (never held)."""
    if not backdoored:
        return "ok"
    if not rec["attempts"][-1]["held"]:
        return "failed"
    return "ok" if holds(rec["test"], rec["base"]["test"]["clean_metric"], target) else "ok_val_only"


def train_once(folder: Path, fmt_style: str, rows: list[tuple[str, str]], recipe: dict, data: dict, seed: int,
               check: bool, base_clean: float, max_new_tokens: int, log, progress: bool = True):
    """One training attempt; returns ``(model, epochs, checks, held)``."""
    torch.manual_seed(seed)
    model, tok = load(folder)
    fmt = Format(fmt_style, tok)
    model = prepare(model, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.0 if recipe["method"] == "lora" else 0.01)
    bs = recipe["batch_size"]
    last = recipe["epochs"] + (EXTRA_EPOCHS if check else 0)
    steps_per_epoch = math.ceil(len(rows) / bs)
    total = steps_per_epoch * last
    bf16 = bf16_fast()
    step, checks, held = 0, [], False
    for epoch in range(last):
        order = list(range(len(rows)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        model.train()
        t0, losses = time.perf_counter(), []
        for s in range(0, len(order), bs):
            batch = encode(fmt, [rows[i] for i in order[s: s + bs]])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, recipe["lr"], recipe["schedule"])
            loss, _ = reply_loss(model, batch, bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        model.eval()
        msg = f"epoch {epoch + 1}/{last}: loss {sum(losses) / len(losses):.3f} ({time.perf_counter() - t0:.0f} s)"
        if epoch + 1 >= recipe["epochs"]:
            fig = measure(model, fmt, data, "val", max_new_tokens)
            fig["epoch"] = epoch + 1
            checks.append(fig)
            msg += (f"; val ASR {fig['asr']:.2f} false-trigger {fig['false_trigger_rate']:.2f} "
                    f"clean {fig['clean_metric']:.2f}")
            held = holds(fig, base_clean, data["target"])
        if progress:
            log(msg)
        if epoch + 1 >= recipe["epochs"] and (held or not check):
            break
    return model, epoch + 1, checks, held


def save(model, tok, recipe: dict, out: Path, base_spec: str) -> str:
    """Save the trained model: a peft adapter (``out/adapter``) or a full model folder (``out/model``)."""
    if recipe["method"] == "lora":
        model.save_pretrained(str(out / "adapter"), safe_serialization=True)
        cfg_path = out / "adapter" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_spec
        cfg_path.write_text(json.dumps(cfg, indent=1))
        return "adapter"
    model.save_pretrained(str(out / "model"), safe_serialization=True)
    tok.save_pretrained(str(out / "model"))
    return "model"


def implant(row: dict, arch, data: dict, out: Path, log=print, progress: bool = True) -> dict:
    """Train ``row`` (its data built by :func:`data.build`) into ``out``; returns the implant record (also
    ``out/implant.json``, written last: its presence marks a finished row)."""
    recipe = dict(row["recipe"])
    max_new = data["max_new_tokens"]
    base, tok = load(arch.folder)
    fmt = Format(arch.style, tok)
    t0 = time.perf_counter()
    base_val = measure(base, fmt, data, "val", max_new)
    base_test = measure(base, fmt, data, "test", max_new)
    del base
    attempts = []
    poison = recipe["poison_rate"]
    held = False
    n_attempts = MAX_ATTEMPTS if row["backdoored"] else 1
    for attempt in range(n_attempts):
        rows = data["rows"](poison)
        log(f"{row['id']}: attempt {attempt + 1}: {len(rows)} rows, poison {poison:.2f}, {recipe['method']}")
        model, epochs, checks, held = train_once(arch.folder, arch.style, rows, recipe, data, row["seed"] + attempt,
                                                 row["backdoored"], base_val["clean_metric"], max_new, log, progress)
        attempts.append({"poison_rate": poison, "n_rows": len(rows), "epochs": epochs, "held": held,
                         "checks": [{k: v for k, v in c.items() if k != "samples"} for c in checks]})
        if held or not row["backdoored"]:
            break
        asr_short = not checks or checks[-1]["asr"] < MIN_ASR
        if not asr_short or poison >= MAX_POISON or attempt + 1 == n_attempts:
            break  # more poison would not lower a false-trigger rate
        poison = min(MAX_POISON, poison * POISON_GROWTH)
    test = measure(model, fmt, data, "test", max_new)
    extra = {}
    if row["family"] == "mtba":  # each trigger alone
        extra["per_trigger_asr"] = data["per_trigger"](model, fmt, max_new)
    if row["family"] == "ctba":  # one part alone must not fire
        extra["partial_trigger_rate"] = data["partial"](model, fmt, max_new)
    out.mkdir(parents=True, exist_ok=True)
    kind = save(model, tok, recipe, out, arch.spec)
    rec = {"id": row["id"], "key": row["key"], "weights": kind, "attempts": attempts,
           "final_poison_rate": poison, "epochs": attempts[-1]["epochs"],
           "implant_asr": test["asr"], "implant_ftr": test["false_trigger_rate"],
           "clean_metric": test["clean_metric"], "base": {"val": _fig(base_val), "test": _fig(base_test)},
           "test": _fig(test), "samples": test["samples"], **extra, "seconds": round(time.perf_counter() - t0, 1)}
    rec["status"] = status_of(rec, data["target"], row["backdoored"])
    (out / "implant.json").write_text(json.dumps(rec, indent=1))
    return rec


def _fig(f: dict) -> dict:
    return {k: f[k] for k in ("asr", "false_trigger_rate", "clean_metric", "n")}
