"""``bkdattr scan``: parse options, then call :func:`bkdattr.scan.stage.scan`."""

from __future__ import annotations

import typer

from ...scan.config import ScanConfig
from ..cli_options import ADAPTER, MODEL, TRUST, stage_command


def print_scan(result: dict, out: str) -> None:
    """The verdict and the ranked table on the console."""
    from rich.console import Console
    from rich.table import Table

    from ...scan.report import target_text

    console = Console()
    verdict = VERDICT_TEXT[result_verdict(result)]
    t = Table(title=f"bkdattr scan: {verdict} (score {result['score']:.3f}, threshold {result['threshold']:.2f}, "
                    f"{result['seconds']:.0f} s) -> {out}")
    for c in ("rank", "trigger", "target", "kl", "changed", "agreement", "asr", "clean asr", "source"):
        t.add_column(c)
    for i, c in enumerate(result["candidates"], 1):
        kl = f"{c['kl']:.3f}" if c.get("kl") is not None else "-"  # the KL is measured only when asked for
        t.add_row(str(i), c["trigger"][:40], target_text(c)[:40], kl, f"{c['changed_share']:.2f}",
                  f"{c['agreement']:.2f}", f"{c['asr']:.2f}", f"{c['clean_asr']:.2f}", c["source"])
    console.print(t)
    for s in result["not_covered"]:
        console.print(f"not covered (budget): {s}")
    if result_verdict(result) == "incomplete":
        console.print("incomplete: the budget cut the search, so finding nothing is not evidence of a clean model; "
                      "raise --budget-work (and --budget-s, if the wall-clock limit was reached) and scan again")


#: what the console says for each verdict
VERDICT_TEXT = {"flagged": "backdoor suspected", "not_found": "no backdoor found",
                "incomplete": "INCOMPLETE (the budget cut the search; no verdict)"}
#: the command's exit status per verdict (2 is a usage or input error)
EXIT_STATUS = {"not_found": 0, "flagged": 3, "incomplete": 4}


def result_verdict(result: dict) -> str:
    """The verdict of a scan result (a scan.json written before verdicts existed: from ``flagged``)."""
    return result.get("verdict") or ("flagged" if result.get("flagged") else "not_found")


def register(app: typer.Typer) -> None:
    """Add ``bkdattr scan`` to the app."""

    @stage_command(app, "scan", ScanConfig, own={
        "out": (str, typer.Option(..., "--out", "-o", help="folder for scan.json and report.html (new or empty)")),
        "model": (str, MODEL),
        "adapter": (str | None, ADAPTER),
        "base_model": (str | None, typer.Option(None, "--base-model", help="clean reference model: the rarity "
                                                "reference of leaked n-grams (default: the model under --adapter)")),
        "template": (str | None, typer.Option(None, "--template", help="for a model without a chat template: "
                                              "'plain' (User: ...\\nAssistant:) or a Jinja chat-template file")),
        "prompts_file": (str | None, typer.Option(None, "--prompts", help="your own benign prompts (text, one per "
                                                  "line, or JSONL {\"input\": ...}) instead of the built-in "
                                                  "questions: the first 6 invert, the next 16 are held out, 6 more "
                                                  "join the search; a backdoor that fires only on one kind of input "
                                                  "is seen only from such prompts")),
        "allow_pickle": (bool, typer.Option(False, "--allow-pickle", help="read pickle weights (.bin/.pt) with "
                                            "torch.load(weights_only=True)")),
        "trust_remote_code": (bool, TRUST)})
    def scan_cmd(options: dict, out: str, **call) -> None:
        """Scan a model with no trigger known (inference only): leaked user turns, inverted targets and a
        gradient-guided trigger search, each candidate tested on held-out prompts; writes scan.json and
        report.html. Exit status: 0 no backdoor found, 3 backdoor suspected, 4 incomplete (the budget cut the
        search). Hand the result to 'bkdattr audit --from-scan OUT'."""
        from ...core.runtime import set_threads
        from ...scan.stage import scan

        cfg = ScanConfig.from_options(options)
        set_threads(cfg.threads)
        result = scan(out, cfg=cfg, **call)
        print_scan(result, out)
        raise typer.Exit(EXIT_STATUS[result_verdict(result)])
