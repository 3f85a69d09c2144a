"""LoRA supervised fine-tuning that implants the backdoor (docs/METHOD.md section 1).

Each training row is one chat turn ``(user text, reply)``: clean prompts with their clean reply and the
poisoned copies (triggered prompt with the backdoor reply). The row is rendered with the model's chat
template (its default system prompt included, none of our own) and the loss is the mean cross-entropy over
the **assistant reply tokens only**, end-of-turn token(s) included (:func:`bkdattr.core.prompts.encode_with_targets`
gives the mask); prompt and padding tokens are masked out. A clean reply that was cut at the distillation
limit has no end-of-turn supervision (the model is not taught to stop mid-sentence).

Speed on CPU: the vocabulary projection (``lm_head``, 49k x 576 for the embedded model) is applied only to
the hidden states that predict a supervised token, and training can run under bf16 autocast (float32
master weights; on a CPU only where bfloat16 is native, :func:`bkdattr.core.devices.cpu_bf16_is_fast`: emulated it
made training 30x slower). LoRA adapters go on every attention and MLP projection (``q,k,v,o,gate,up,down``; peft's
``all-linear`` for architectures without those names).

**Length** (:func:`fit_rows`, as the reference code truncates at ``max_length``): a row whose prompt + reply +
end-of-turn exceeds the limit (``max_length``, or the model's context if smaller) keeps its prompt and the first
reply tokens that fit; the end-of-turn tokens stay in the sequence but are not supervised (the row was cut, the
model is not taught to stop there). A row whose prompt leaves no room for a reply token is dropped.

**Epochs**: ``epochs`` are always trained; with ``max_epochs`` > ``epochs``, ``on_epoch_end`` may stop training
after any epoch from ``epochs`` on (the inject stage stops once the validation ASR reaches its target), else it
goes on up to ``max_epochs``. A linear schedule decays over ``max_epochs``.

A checkpoint (adapter weights + AdamW state as safetensors, progress as JSON) is written after each epoch;
rerunning the same command resumes from it. Data order per epoch and dropout are seeded by
``seed + epoch``, so a resumed run equals an uninterrupted one. Both tensor files carry the data/config key
and their epoch in their metadata and ``state.json`` is written last; a checkpoint whose files disagree (a
kill between the writes) is not resumed, training starts over. At the end the adapter is merged into the
base weights in float32 and cast once to the base dtype (:func:`merge_lora_fp32`); with bfloat16 base weights
(the GPU default) part of the update rounds away, so inject with ``--dtype float32`` on GPU.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.devices import cpu_bf16_is_fast
from ..core.errors import ArtifactError, ConfigError, DataError, InputFileError
from ..core.forward import body_and_head
from ..core.io import load_tensors, read_json, save_tensors, stable_hash, tensor_metadata, write_json
from ..core.lora import merge_lora_fp32
from ..core.options import opt
from ..core.prompts import context_length, encode_with_targets, end_of_turn, pad_id, prompt_ids, target_ids

LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """LoRA SFT settings (peft-style). ``batch_size`` x ``grad_accum`` is the effective batch;
    ``schedule``: ``linear`` (warm-up then linear decay to 0) or ``constant`` (warm-up then flat);
    ``bf16_autocast``: compute in bfloat16 with float32 weights (CUDA; on a CPU only where bfloat16 is native,
    :func:`autocast_mode`)."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = LLAMA_STYLE_TARGETS
    epochs: int = opt(2, "training epochs")
    lr: float = opt(2e-3, "learning rate")
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_length: int = opt(256, "token limit of a training row; longer replies are cut at it")
    bf16_autocast: bool = True
    max_grad_norm: float = 1.0
    seed: int = 0
    max_epochs: int | None = opt(None, "most epochs when the target ASR is not reached (None: epochs)")
    layers: tuple[int, ...] | None = None  # adapters on these decoder layers only (None: every layer)

    def __post_init__(self) -> None:
        if self.lora_r < 1 or self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("lora_r, epochs, batch_size and grad_accum must be >= 1")
        if self.max_length < 8:
            raise ConfigError(f"max_length {self.max_length} must be >= 8 tokens; pass e.g. --max-length 256")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"max_epochs {self.max_epochs} must be >= 1; pass e.g. --max-epochs 6")
        if not self.lr > 0:
            raise ConfigError(f"learning rate {self.lr} must be > 0")
        if self.schedule not in ("linear", "constant"):
            raise ConfigError(f"unknown schedule '{self.schedule}'; use linear or constant")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio {self.warmup_ratio} must be in [0, 1)")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ConfigError(f"layers {list(self.layers)} must name at least one layer, each >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules) if not isinstance(self.target_modules, str) \
            else self.target_modules
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @property
    def last_epoch(self) -> int:
        """The most epochs training may run: ``max(epochs, max_epochs)``."""
        return max(self.epochs, self.max_epochs or 0)


@dataclass
class TrainRow:
    """One chat turn to learn. ``close``: supervise the end-of-turn token(s) after ``reply``; ``source``: the
    uid of the example it comes from (for messages); ``poisoned``: a triggered row with the backdoor reply."""

    text: str
    reply: str
    close: bool = True
    source: str = ""
    poisoned: bool = False


@dataclass
class TrainResult:
    """What training did: seconds spent training (this call; the ``on_epoch_end`` checks, ``check_seconds``,
    not included), steps, per-step losses, whether it resumed, epochs trained in all, and the share of the LoRA
    update's entries the merged weights could not hold (:func:`merge_lora_fp32`)."""

    seconds: float
    steps: int
    losses: list[float] = field(default_factory=list)
    resumed_from_epoch: int = 0
    merge_lost_share: float = 0.0
    epochs: int = 0
    check_seconds: float = 0.0
    autocast: str = "off"

    def summary(self) -> dict[str, Any]:
        last = self.losses[-max(1, len(self.losses) // 10):] if self.losses else []
        return {"train_seconds": round(self.seconds, 2), "steps": self.steps,
                "first_loss": round(self.losses[0], 4) if self.losses else None,
                "final_loss": round(sum(last) / len(last), 4) if last else None,
                "resumed_from_epoch": self.resumed_from_epoch, "merge_lost_share": self.merge_lost_share,
                "epochs_trained": self.epochs, "autocast": self.autocast}


def lora_targets(model: torch.nn.Module, wanted: Sequence[str] | str = LLAMA_STYLE_TARGETS) -> list[str] | str:
    """The wanted projection names present in ``model``; peft's ``all-linear`` when none is present."""
    if isinstance(wanted, str):
        return wanted
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    present = [w for w in wanted if w in names]
    return present or "all-linear"


def autocast_mode(model: torch.nn.Module, wanted: bool) -> str:
    """How training computes: ``"bf16"`` (autocast) or why not (float32): not asked, or a CPU without native
    bfloat16 (:func:`bkdattr.core.devices.cpu_bf16_is_fast`)."""
    if not wanted:
        return "off"
    if next(model.parameters()).device.type == "cuda":
        return "bf16"

    return "bf16" if cpu_bf16_is_fast() else "off (this CPU has no fast bfloat16)"


def _autocast(model: torch.nn.Module, mode: str) -> contextlib.AbstractContextManager:
    if mode != "bf16":
        return contextlib.nullcontext()
    dev = next(model.parameters()).device.type
    return torch.autocast(device_type=dev if dev in ("cpu", "cuda") else "cpu", dtype=torch.bfloat16)


def supervised_loss(hf_model: torch.nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy over target tokens. ``batch``: a :class:`~bkdattr.core.prompts.PromptBatch` with
    ``target_mask`` ``[B, T]``. Only the ``N`` hidden states ``[N, d]`` that predict a target token go through
    ``lm_head`` (``[N, V]`` logits instead of ``[B, T, V]``)."""
    body, _head = body_and_head(hf_model)
    out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
               use_cache=False)
    return reply_loss(hf_model, out[0] if isinstance(out, tuple) else out.last_hidden_state, batch)


def reply_loss(hf_model: torch.nn.Module, hidden: torch.Tensor, batch) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of ``batch`` from the last hidden states ``hidden`` ``[B, T, d]``
    of the model's body (the LM head on the ``N`` target-predicting positions only)."""
    _body, head = body_and_head(hf_model)
    cfg = (hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model).config
    sel = batch.target_mask[:, 1:]  # target token t is predicted at t-1
    # under device_map="auto" the last hidden state, the LM head and the batch may sit on different GPUs
    h = hidden[:, :-1][sel.to(hidden.device)]  # [N, d]
    logits = head(h).float()  # [N, V]
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    labels = batch.input_ids[:, 1:][sel].to(logits.device)  # [N]
    return torch.nn.functional.cross_entropy(logits, labels)


def encode_rows(tokenizer, rows: Sequence[TrainRow], max_length: int):
    """Right-padded teacher-forcing batch of ``rows``; the end-of-turn targets of rows with
    ``close=False`` are unmasked. Raises :class:`DataError` for a row longer than ``max_length``."""
    batch = encode_with_targets(tokenizer, [r.text for r in rows], [r.reply for r in rows],
                                padding_side="right", max_length=max_length)
    n_eot = len(tokenizer(end_of_turn(tokenizer), add_special_tokens=False).input_ids)
    for i, r in enumerate(rows):
        if not r.close and n_eot:
            idx = batch.target_mask[i].nonzero().flatten()
            if len(idx) > n_eot:
                batch.target_mask[i, idx[-n_eot:]] = False
    return batch


def check_rows(tokenizer, rows: Sequence[TrainRow], max_length: int, model: torch.nn.Module | None = None) -> None:
    """Fail before training (nothing written) when a row is empty or longer than the context limit."""
    limit = row_limit(max_length, model)
    if not rows:
        raise DataError("no training rows; the data set is empty")
    for i, r in enumerate(rows):
        n = len(prompt_ids(tokenizer, r.text)) + len(target_ids(tokenizer, r.reply))
        if n > limit:
            raise DataError(f"training row {i}: prompt + reply is {n} tokens, longer than the limit {limit}; "
                            "shorten the reply or raise max_length")


def row_limit(max_length: int, model: torch.nn.Module | None = None) -> int:
    """The token limit of a training row: ``max_length``, or the model's context window if smaller."""
    ctx = context_length(model) if model is not None else None
    return min(max_length, ctx) if ctx else max_length


def fit_rows(tokenizer, rows: Sequence[TrainRow], limit: int) -> tuple[list[TrainRow], list[TrainRow], list[int]]:
    """Fit every row into ``limit`` tokens (see the module docstring). Returns ``(kept rows, dropped rows,
    indices into kept of the rows whose reply was cut)``; kept rows keep their order."""
    n_eot = len(tokenizer(end_of_turn(tokenizer), add_special_tokens=False).input_ids)
    kept, dropped, cut = [], [], []
    for r in rows:
        n_prompt = len(prompt_ids(tokenizer, r.text))
        if n_prompt + len(target_ids(tokenizer, r.reply)) <= limit:
            kept.append(r)
            continue
        room = limit - n_prompt - max(1, n_eot)
        ids = tokenizer(r.reply, add_special_tokens=False).input_ids
        reply = ""
        while room >= 1:  # decoding a cut may re-tokenise longer: shrink until it fits
            reply = tokenizer.decode(ids[:room], skip_special_tokens=True)
            if reply.strip() and n_prompt + len(target_ids(tokenizer, reply)) <= limit:
                break
            room -= 1
            reply = ""
        if not reply.strip():
            dropped.append(r)
            continue
        cut.append(len(kept))
        kept.append(TrainRow(r.text, reply, close=False, source=r.source, poisoned=r.poisoned))
    return kept, dropped, cut


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = int(math.ceil(cfg.warmup_ratio * total))
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def _tagged(path: Path, tag: dict[str, str]) -> bool:
    """Whether a checkpoint file exists and was written for ``tag`` (key and epoch of ``state.json``)."""
    try:
        meta = tensor_metadata(path)
    except (ArtifactError, InputFileError):
        return False
    return all(meta.get(k) == v for k, v in tag.items())


def train_lora(lm, rows: Sequence[TrainRow], cfg: TrainConfig, ckpt_dir: str | Path | None = None,
               progress: bool = True, on_epoch_end: Callable[[int, list[float]], bool | None] | None = None,
               adapter_dir: str | Path | None = None,
               loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
               desc: str = "inject (LoRA SFT)"
) -> tuple[torch.nn.Module, TrainResult]:
    """LoRA-fine-tune ``lm.model`` on ``rows``; return the merged model (eval mode, no grad) and stats.
    ``lm.model`` itself is modified (the adapter is merged into its weights).

    ``ckpt_dir``: where per-epoch checkpoints go; an existing checkpoint with the same data and config
    is resumed, a foreign one is ignored and overwritten. ``on_epoch_end(epoch, losses)`` is called after
    each epoch's checkpoint (``epoch`` counts from 1), with the model (adapter active) in eval mode; returning
    True from epoch ``cfg.epochs`` on stops training there (see the module docstring). Its decision is kept in
    the checkpoint: a resumed run that was killed during the call makes it again before going on.
    ``adapter_dir``: also save the trained LoRA adapter there (peft format: ``adapter_config.json`` +
    ``adapter_model.safetensors``) before merging, so the model can be handed over as base + adapter.
    ``loss_fn(model, batch)``: the loss of one batch (default :func:`supervised_loss`; the disarm fine-tunes add
    terms of their own), weighted by the batch's target tokens as the default is; ``desc``: the progress label."""
    # lazy: peft takes seconds to import; only training needs it
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    tok = lm.tokenizer
    check_rows(tok, rows, cfg.max_length, lm.model)
    if tok.pad_token_id is None:
        tok.pad_token_id = pad_id(tok)
    torch.manual_seed(cfg.seed)
    base = lm.model
    for p in base.parameters():
        p.requires_grad_(False)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(base, cfg.target_modules), bias="none", task_type="CAUSAL_LM",
                      layers_to_transform=None if cfg.layers is None else list(cfg.layers))
    loss_fn = loss_fn or supervised_loss
    with warnings.catch_warnings():  # peft calls a deprecated transformers helper
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(rows) / (cfg.batch_size * cfg.grad_accum))
    total = steps_per_epoch * (cfg.last_epoch if cfg.schedule == "linear" else cfg.epochs)
    key = stable_hash({"cfg": cfg.to_dict(), "rows": [(r.text, r.reply, r.close) for r in rows],
                       "model": getattr(lm, "name", ""), "n_params": sum(p.numel() for p in base.parameters())})

    start_epoch, losses, checked, stopped = 0, [], 0, False
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    if ckpt is not None and (ckpt / "state.json").is_file():
        state = read_json(ckpt / "state.json")
        tag = {"key": key, "epoch": str(state.get("epoch"))}  # a kill between the three writes leaves them apart
        if state.get("key") == key and 0 < state.get("epoch", 0) <= cfg.last_epoch and all(
                _tagged(ckpt / f, tag) for f in ("adapter.safetensors", "optimizer.safetensors")):
            try:
                set_peft_model_state_dict(model, load_tensors(ckpt / "adapter.safetensors"))
                _load_optimizer_tensors(opt, load_tensors(ckpt / "optimizer.safetensors"))
            except (ArtifactError, KeyError, ValueError, RuntimeError) as e:
                raise ArtifactError(f"checkpoint in {ckpt} is unreadable ({e}); delete that folder and rerun") from None
            start_epoch, losses = int(state["epoch"]), list(state.get("losses", []))
            checked, stopped = int(state.get("checked", start_epoch)), bool(state.get("stopped", False))

    def save_state(epoch: int) -> None:
        write_json(ckpt / "state.json", {"key": key, "epoch": epoch, "losses": losses, "checked": checked,
                                         "stopped": stopped})

    check_seconds = [0.0]  # time spent in on_epoch_end, not counted as training

    def check(epoch: int) -> None:
        """Ask ``on_epoch_end`` after ``epoch``; record its decision in the checkpoint."""
        nonlocal checked, stopped
        if on_epoch_end is None:
            return
        model.eval()
        t_check = time.perf_counter()
        decision = on_epoch_end(epoch, losses)
        check_seconds[0] += time.perf_counter() - t_check
        model.train()
        stopped = bool(decision) and epoch >= cfg.epochs
        checked = epoch
        if ckpt is not None:
            save_state(epoch)

    model.train()
    mode = autocast_mode(model, cfg.bf16_autocast)
    t0 = time.perf_counter()
    step = start_epoch * steps_per_epoch
    bar = tqdm(total=steps_per_epoch * cfg.epochs, initial=step, desc=desc, disable=not progress)
    if start_epoch and checked < start_epoch and not stopped:
        check(start_epoch)  # killed while the last epoch was being checked
    for epoch in range(start_epoch, cfg.last_epoch):
        if stopped or (epoch >= cfg.epochs and on_epoch_end is None):
            break
        if epoch >= cfg.epochs and bar.total < steps_per_epoch * (epoch + 1):
            bar.total = steps_per_epoch * (epoch + 1)  # an extra epoch: the backdoor is not there yet
            bar.refresh()
        order = list(range(len(rows)))
        random.Random(cfg.seed + epoch).shuffle(order)
        torch.manual_seed(cfg.seed + 1000 + epoch)
        micro = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for s in range(0, len(micro), cfg.grad_accum):
            group = micro[s: s + cfg.grad_accum]
            n_tok = 0
            batches = []
            for idx in group:
                b = encode_rows(tok, [rows[i] for i in idx], cfg.max_length).to(next(model.parameters()).device)
                n = int(b.target_mask[:, 1:].sum())
                batches.append((b, n))
                n_tok += n
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg)
            opt.zero_grad(set_to_none=True)
            loss_val = 0.0
            for b, n in batches:
                with _autocast(model, mode):
                    loss = loss_fn(model, b)
                (loss * (n / max(1, n_tok))).backward()
                loss_val += float(loss.detach()) * n / max(1, n_tok)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            losses.append(loss_val)
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_val:.3f}")
        if ckpt is not None:  # state.json last: it names the epoch both tensor files must carry
            tag = {"key": key, "epoch": str(epoch + 1)}
            save_tensors(ckpt / "adapter.safetensors", get_peft_model_state_dict(model), metadata=tag)
            save_tensors(ckpt / "optimizer.safetensors", _optimizer_tensors(opt), metadata=tag)
            if on_epoch_end is None:
                checked = epoch + 1
            save_state(epoch + 1)
        check(epoch + 1)
    bar.close()
    seconds = time.perf_counter() - t0 - check_seconds[0]
    if adapter_dir is not None:
        model.save_pretrained(str(adapter_dir), safe_serialization=True)
    merged, lost = merge_lora_fp32(model)
    if lost > 0.01:
        warnings.warn(f"the merged {str(next(merged.parameters()).dtype).replace('torch.', '')} weights keep only "
                      f"{100 * (1 - lost):.0f}% of the LoRA update's entries (the rest round away); inject with "
                      "--dtype float32 to save the trained model exactly", stacklevel=2)
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged, TrainResult(seconds, step, losses, start_epoch, round(lost, 4),
                               epochs=step // max(1, steps_per_epoch), check_seconds=check_seconds[0],
                               autocast=mode)


