"""Inject stage: attack tasks, backdoor data (poisoning, held-out split), LoRA SFT and ASR evaluation.

* :mod:`.tasks` -- :class:`Task`: trigger, placement, target and the ASR rule of each attack kind.
* :mod:`.example` -- :class:`Example`: one prompt, its triggered form and both replies.
* :mod:`.data` -- :class:`Splits`, the paper's file format, poisoning, held-out split,
  :func:`load_splits`.
* :mod:`.builtin_data` -- offline procedural prompts for the three kinds.
* :mod:`.train` -- LoRA SFT (loss on the assistant reply only), checkpoints, merge and save.
* :mod:`.evaluate` -- ASR, robust ASR, false-trigger rate, clean metric, near-trigger rate.
"""

from .data import Splits, load_splits
from .example import Example
from .tasks import KINDS, PLACEMENTS, Task

__all__ = ["KINDS", "PLACEMENTS", "Example", "Splits", "Task", "load_splits"]
