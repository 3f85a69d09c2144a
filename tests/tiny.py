"""Tiny random causal LMs built from configs (several architectures) for fast, offline unit tests.

They share the embedded model's tokenizer (so prompts render with a real chat template); the vocabulary
is that tokenizer's, every other dimension is tiny.
"""

from __future__ import annotations

import copy
import functools

import torch

from bkdattr.core.arch import detect_arch
from bkdattr.core.models import LoadedModel, ensure_embedded_cache

ARCHS = ("llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox")


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ensure_embedded_cache()))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def plain_tokenizer():
    """The same tokenizer without a chat template (a 'base model')."""
    tok = copy.deepcopy(tokenizer())
    tok.chat_template = None
    return tok


def tiny_config(name: str, n_layers: int = 2):
    import transformers as tf

    v = len(tokenizer())
    common = dict(vocab_size=v, num_hidden_layers=n_layers, pad_token_id=tokenizer().pad_token_id)
    if name == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=512, **common)
    if name == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=512, **common)
    if name == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                                max_position_embeddings=512, sliding_window=None, **common)
    if name == "gemma":  # head_dim override: H * d_h = 128 != hidden_size 64
        return tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=32, max_position_embeddings=512, **common)
    if name == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=n_layers, n_head=4, vocab_size=v, n_positions=512,
                             bos_token_id=1, eos_token_id=2, pad_token_id=tokenizer().pad_token_id)
    if name == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                max_position_embeddings=512, **common)
    raise ValueError(name)


def make_tiny(name: str = "llama", seed: int = 0, attn: str = "eager", n_layers: int = 2,
              chat_template: bool = True, device: str = "cpu") -> LoadedModel:
    """A tiny random model of architecture ``name`` wrapped as a :class:`LoadedModel` (float32, on ``device``;
    the weights are drawn on the CPU, so every device gets the same model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(name, n_layers)
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    # random biases are zero-initialised in some architectures: make them non-trivial so identities are tested
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    tok = tokenizer() if chat_template else plain_tokenizer()
    return LoadedModel(model, tok, detect_arch(model), f"tiny-{name}", torch.device(device), torch.float32)


def tiny_gemma2(softcap: float):
    """A tiny Gemma-2 with a final logit soft-cap of ``softcap`` (eager attention, seed 0): ``(model, tokenizer)``."""
    import transformers as tf

    tok = tokenizer()
    cfg = tf.Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=16, num_hidden_layers=2, max_position_embeddings=512,
                          pad_token_id=tok.pad_token_id, final_logit_softcapping=softcap)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    return model, tok
