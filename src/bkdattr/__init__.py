"""bkdattr: find, explain and switch off backdoors in fine-tuned language models.

Stages (one subpackage each): ``inject`` (poison data, implant a LoRA backdoor), ``probe`` (per-layer
backdoor probes, ICLA), ``attribution`` (BAHA: per-head ACIE), ``control`` (head ablation, Backdoor Vector),
``report`` (figures and HTML). Foundations: ``models``, ``arch``, ``prompts``, ``hooks``, ``generation``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
