"""``bkdattr attribute``: parse options, then call :func:`bkdattr.attribution.stage.run_stage`.

Scale-out: ``--workers N`` spawns N local processes (torch.distributed, gloo on CPU / nccl on CUDA);
``torchrun --nproc_per_node N --no-python bkdattr attribute -r RUN ...`` works too (each rank runs this
command; write ``-r`` rather than ``--run``, which torchrun's own parser takes for its ``--run-path``).
Either way the result is bitwise identical to a single-process run with the same threads per process.
"""

from __future__ import annotations

import typer

from ...attribution.stage import AttributeConfig
from ..cli_options import stage_command


def register(app: typer.Typer) -> None:
    """Add ``bkdattr attribute`` to the app."""

    @stage_command(app, "attribute", AttributeConfig)
    def attribute_cmd(options: dict, run: str) -> None:
        """BAHA: ACIE of every attention head (mean triggered contribution patched into clean prompts)."""
        from ...attribution.stage import print_summary, run_stage
        from ...core.distributed import is_main
        from ...core.rundir import RunDir

        top_k = AttributeConfig.from_options(options).top_k  # a bad option fails before the run is read
        rd = RunDir(run)
        section = run_stage(rd, options)
        if is_main():
            print_summary(rd, k=top_k)
            typer.echo(f"attribution: {section.get('method')} in {section.get('seconds')} s "
                       f"(strategy {section.get('strategy')}, {section.get('world_size')} process(es)); "
                       f"saved to {rd.path / 'attribution'}")
