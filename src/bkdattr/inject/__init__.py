"""Inject stage: attack tasks, backdoor data (poisoning, held-out split), LoRA SFT and ASR evaluation.

* :mod:`.tasks` -- :class:`Task`: trigger, placement, target and the ASR rule of each attack kind.
* :mod:`.data` -- :class:`Example`, :class:`Splits`, the paper's file format, poisoning, held-out split,
  :func:`load_splits`.
* :mod:`.builtin_data` -- offline procedural prompts for the three kinds.
* :mod:`.train` -- LoRA SFT (loss on the assistant reply only), checkpoints, merge and save.
* :mod:`.evaluate` -- ASR, robust ASR, false-trigger rate, clean metric, near-trigger rate.
"""

from .data import Example, Splits, load_splits
from .tasks import KINDS, PLACEMENTS, Task

__all__ = ["KINDS", "PLACEMENTS", "Example", "Splits", "Task", "load_splits"]
