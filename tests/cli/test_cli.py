"""`diffutron-engine generate` and `env`: outputs, flags, and every bad input (exit 2, one line on
stderr, no traceback, no output file)."""

import io
import json
import os
import subprocess
import sys

import pytest

from diffutron_engine.cli.main import main

FAST = ["--max-new-tokens", "8", "--steps", "8", "--block-size", "4", "--seed", "0"]


def run_cli(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys, tiny_checkpoint):
    code, out, err = run_cli(capsys, "generate", "Merhaba, nasılsın?", "Bir şiir yaz.", "--model", tiny_checkpoint,
                             "--json", *FAST)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Merhaba, nasılsın?", "Bir şiir yaz."]
    for r in rows:
        assert set(r) >= {"prompt", "text", "new_tokens", "forward_passes", "seconds"}
        assert isinstance(r["text"], str) and 0 <= r["new_tokens"] <= 8
        assert r["forward_passes"] == 8 and r["seconds"] > 0


def test_plain_text_and_batching_give_the_same_greedy_text(capsys, tiny_checkpoint):
    prompts = ["Merhaba", "Türkiye'nin başkenti neresidir?", "Kitap"]
    code, one, _ = run_cli(capsys, "generate", *prompts, "--model", tiny_checkpoint, "--json", *FAST)
    code2, batched, _ = run_cli(capsys, "generate", *prompts, "--model", tiny_checkpoint, "--json",
                                "--batch-size", "3", *FAST)
    assert code == code2 == 0
    texts = lambda s: [json.loads(line)["text"] for line in s.splitlines()]  # noqa: E731
    assert texts(one) == texts(batched)
    code, plain, _ = run_cli(capsys, "generate", *prompts, "--model", tiny_checkpoint, *FAST)
    assert code == 0 and plain == "\n".join(t + "\n" for t in texts(one))


def test_stdin_prompts_one_per_line(capsys, monkeypatch, tiny_checkpoint):
    code, out, err = run_cli(capsys, "generate", "--model", tiny_checkpoint, "--json", *FAST,
                             stdin=io.StringIO("ilk soru\n\nikinci soru\n"), monkeypatch=monkeypatch)
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["ilk soru", "ikinci soru"]


def test_jsonl_input_with_messages_and_output_file(capsys, tmp_path, tiny_checkpoint):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "Merhaba"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Kısa cevap ver."}, {"role": "user", "content": "Başkent?"}]}
    ) + "\n", encoding="utf-8")
    dst = tmp_path / "out.jsonl"
    code, out, err = run_cli(capsys, "generate", "--input", str(src), "--output", str(dst), "--json",
                             "--model", tiny_checkpoint, "--no-chat", *FAST)
    assert code == 0, err
    assert out == ""
    rows = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["prompt"] == "Merhaba" and rows[1]["prompt"][1]["content"] == "Başkent?"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".diffutron-")] == []


def test_preset_and_flags(capsys, tiny_checkpoint):
    from diffutron_engine.cli import generate

    parser = __import__("diffutron_engine.cli.main", fromlist=["build_parser"]).build_parser()
    args = parser.parse_args(["generate", "x", "--preset", "diffutron-long", "--steps", "16",
                              "--block-length", "8", "--stop", "</s>", "--stop", "<s>", "--stochastic-transfer"])
    cfg, engine = generate.settings(args)
    assert engine.cache == "none"
    assert (cfg.steps, cfg.block_size, cfg.temperature, cfg.repetition_penalty) == (16, 8, 0.1, 1.2)
    assert cfg.stop_strings == ["</s>", "<s>"] and cfg.stochastic_transfer
    code, out, err = run_cli(capsys, "generate", "Merhaba", "--model", tiny_checkpoint, "--preset",
                             "diffutron-short", "--max-new-tokens", "6", "--steps", "6", "--json")
    assert code == 0, err
    assert json.loads(out)["forward_passes"] == 6


def test_diffutron_stops_flag():
    from diffutron_engine.cli import generate
    from diffutron_engine.cli.main import build_parser
    from diffutron_engine.config import DIFFUTRON_STOP_STRINGS

    args = build_parser().parse_args(["generate", "x", "--diffutron-stops", "--stop", "END"])
    assert generate.settings(args)[0].stop_strings == ["END", *DIFFUTRON_STOP_STRINGS]


def test_output_file_gets_the_usual_permissions(capsys, tmp_path, tiny_checkpoint):
    dst = tmp_path / "o.txt"
    code, _, err = run_cli(capsys, "generate", "x", "--model", tiny_checkpoint, "--output", str(dst), *FAST)
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~umask


def test_output_writes_through_a_symlink_to_its_target(capsys, tmp_path, tiny_checkpoint):
    """--output naming a symbolic link writes the file the link leads to (atomically, beside it, keeping
    its permissions): the link stays a link."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "answers.txt"
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "link.txt"
    link.symlink_to("real/answers.txt")  # relative, as `ln -s` makes them
    code, out, err = run_cli(capsys, "generate", "Merhaba", "--model", tiny_checkpoint, "--json", "--output",
                             str(link), *FAST)
    assert code == 0 and out == "", err
    assert link.is_symlink() and os.readlink(link) == "real/answers.txt"
    assert json.loads(target.read_text(encoding="utf-8"))["prompt"] == "Merhaba"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["answers.txt"]  # no temporary file left


def test_the_largest_seed_wraps_around_for_the_next_prompt(capsys):
    """Prompt i draws from (seed + i) mod 2**63: with the largest seed, the second prompt gets seed 0 and
    answers what it answers alone with --seed 0."""
    argv = ["generate", "--model", "tiny-tr", "--json", "--temperature", "0.8", "--max-new-tokens", "8", "--steps", "8",
            "--block-size", "8", "--no-early-stop"]
    code, out, err = run_cli(capsys, *argv, "--seed", str(2**63 - 1), "Bu işlev", "Seçili hücrelerin")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["seed"] for r in rows] == [2**63 - 1, 0]
    code, alone, err = run_cli(capsys, *argv, "--seed", "0", "Seçili hücrelerin")
    assert code == 0, err
    assert json.loads(alone)["text"] == rows[1]["text"]


def test_every_command_with_a_model_takes_the_bundled_name(capsys, tmp_path):
    """generate, eval perplexity and serve (Engine.from_pretrained, served in tests/server/test_server.py) resolve
    --model tiny-tr with loading.resolve_model_path; bench builds its own random models."""
    from diffutron_engine import Engine

    code, out, err = run_cli(capsys, "generate", "Bu işlev", "--model", "tiny-tr", *FAST)
    assert code == 0 and out.strip(), err
    data = tmp_path / "heldout.txt"
    data.write_text("Seçili hücrelerin biçimini değiştirir.\nBelgeyi PDF olarak dışa aktarır.\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", "perplexity", "--model", "tiny-tr", "--data", str(data), "--json",
                             "--max-length", "32", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["model"] == "tiny-tr" and json.loads(out)["tokens"] > 0
    assert Engine.from_pretrained("tiny-tr", device="cpu").model.config.model_type == "modernbert"


def test_the_command_line_prints_its_own_warnings_as_one_line():
    from diffutron_engine.cli import main as cli
    from diffutron_engine.errors import DiffutronWarning

    line = cli._one_line_warning("every weight of 'm' is zero", DiffutronWarning, "loading.py", 7)
    assert line == "diffutron-engine: warning: every weight of 'm' is zero\n"
    assert "loading.py:7" in cli._one_line_warning("other", UserWarning, "loading.py", 7)  # others as Python shows them


def test_env(capsys):
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    assert "torch" in out and "cpp extension" in out and "sampler on cpu" in out and "attention on cpu" in out


# ----------------------------------------------------------------------------- bad input
def _not_masked_lm(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(path)
    return str(path)


def _no_mask_tokenizer(tmp_path, tiny_checkpoint):
    import shutil

    path = tmp_path / "nomask"
    shutil.copytree(tiny_checkpoint, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("mask_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<mask>"]
    (path / "tokenizer.json").write_text(json.dumps(tok))
    return str(path)


BAD = {
    "empty prompt": (lambda tmp, ck: ["generate", "  ", "--model", ck], "empty prompt"),
    "beyond context": (lambda tmp, ck: ["generate", "Merhaba", "--model", ck, "--max-new-tokens", "600"],
                       "beyond the model's context of 512; shorten the prompt or lower --max-new-tokens"),
    # the oracle's path checks every prompt before it runs any, and names the one that does not fit
    "beyond context, reference": (lambda tmp, ck: ["generate", "a", "kelime " * 600, "--model", ck, "--reference",
                                                   "--max-new-tokens", "4", "--steps", "4", "--block-size", "4"],
                                  "error: prompt 2: prompt plus new tokens is "),
    "max-new-tokens 0": (lambda tmp, ck: ["generate", "x", "--model", ck, "--max-new-tokens", "0"],
                         "--max-new-tokens must be >= 1"),
    "steps 0": (lambda tmp, ck: ["generate", "x", "--model", ck, "--steps", "0"], "steps must be >= 1"),
    "block-size 0": (lambda tmp, ck: ["generate", "x", "--model", ck, "--block-size", "0"],
                     "--block-size must be >= 1"),
    "unknown remasking": (lambda tmp, ck: ["generate", "x", "--model", ck, "--remasking", "best"],
                          "unknown remasking 'best'"),
    "missing model": (lambda tmp, ck: ["generate", "x", "--model", str(tmp / "missing")], "does not exist"),
    "not a masked LM": (lambda tmp, ck: ["generate", "x", "--model", _not_masked_lm(tmp)], "no masked-LM head"),
    "no mask token": (lambda tmp, ck: ["generate", "x", "--model", _no_mask_tokenizer(tmp, ck)], "no mask token"),
    "malformed jsonl": (lambda tmp, ck: ["generate", "--input", _bad_jsonl(tmp), "--model", ck], "bad.jsonl:3: not valid JSON"),
    "jsonl wrong keys": (lambda tmp, ck: ["generate", "--input", _bad_jsonl(tmp, '{"text": "x"}'), "--model", ck],
                         'bad.jsonl:3: expected an object with either "prompt" or "messages"'),
    "missing input": (lambda tmp, ck: ["generate", "--input", str(tmp / "none.jsonl"), "--model", ck], "cannot read --input"),
    "batch-size 0": (lambda tmp, ck: ["generate", "x", "--model", ck, "--batch-size", "0"], "--batch-size must be >= 1"),
    "output folder missing": (lambda tmp, ck: ["generate", "x", "--model", ck, "--output", str(tmp / "no" / "f")],
                              "is not an existing folder"),
    "output not writable": (lambda tmp, ck: ["generate", "x", "--model", ck, "--output", "/proc/out.txt"],
                            "cannot write --output '/proc/out.txt'"),
    "message content not text": (lambda tmp, ck: ["generate", "--input", _bad_jsonl(
        tmp, '{"messages": [{"role": "user", "content": 5}]}'), "--model", ck], "bad.jsonl:3: message 0 content must be a string"),
    "message unknown role": (lambda tmp, ck: ["generate", "--input", _bad_jsonl(
        tmp, '{"messages": [{"role": "bot", "content": "x"}]}'), "--model", ck], "bad.jsonl:3: message 0 has unknown role 'bot'"),
    "message without user text": (lambda tmp, ck: ["generate", "--input", _bad_jsonl(
        tmp, '{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": " "}]}'), "--model", ck],
        "bad.jsonl:3: empty prompt"),
    "empty prompt in jsonl": (lambda tmp, ck: ["generate", "--input", _bad_jsonl(tmp, '{"prompt": "  "}'), "--model", ck],
                              "bad.jsonl:3): give some text"),
    "corrupt weights": (lambda tmp, ck: ["generate", "x", "--model", _corrupt(tmp, ck)], "could not load model weights"),
    "cuda missing": (lambda tmp, ck: ["generate", "x", "--model", ck, "--device", "cuda:3"],
                    "device 'cuda:3' was asked for but no CUDA GPU is available"),
}


def _corrupt(tmp, ck):
    import shutil

    path = tmp / "corrupt"
    shutil.copytree(ck, path)
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return str(path)


def _bad_jsonl(tmp, third='{"prompt": "x"'):
    path = tmp / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n' + third + "\n")
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(case, capsys, tmp_path, tiny_checkpoint):
    make_argv, message = BAD[case]
    out_file = tmp_path / "result.jsonl"
    argv = make_argv(tmp_path, tiny_checkpoint)
    if "--output" not in argv:
        argv += ["--output", str(out_file)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == "" and not out_file.exists()


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["generate", "x", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["generate", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["generate", "x", "--seed", "99999999999999999999"], "seed 99999999999999999999 is out of range"),
    (["generate", "x", "--seed", "-1"], "seed -1 is out of range"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path, tiny_checkpoint):
    src = _bad_jsonl(tmp_path)
    out_file = tmp_path / "out.txt"
    proc = subprocess.run([sys.executable, "-m", "diffutron_engine", "generate", "--input", src,
                           "--model", tiny_checkpoint, "--output", str(out_file)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"diffutron-engine: error: {src}:3: not valid JSON (Expecting ',' delimiter); "
                                   'expected an object with either "prompt" or "messages"')
    assert not out_file.exists()


# ----------------------------------------------------------------------------- engine flags
def test_engine_and_reference_agree_greedy(capsys, tiny_checkpoint):
    prompts = ["Merhaba", "Türkiye'nin başkenti neresidir?"]
    code, eng, err = run_cli(capsys, "generate", *prompts, "--model", tiny_checkpoint, "--json",
                             "--no-early-stop", *FAST)
    assert code == 0, err
    code, ref, err = run_cli(capsys, "generate", *prompts, "--model", tiny_checkpoint, "--json", "--reference", *FAST)
    assert code == 0, err
    assert [json.loads(x)["text"] for x in eng.splitlines()] == [json.loads(x)["text"] for x in ref.splitlines()]


def test_fast_flags(capsys, tiny_checkpoint):
    from diffutron_engine.cli import generate
    from diffutron_engine.cli.main import build_parser
    from diffutron_engine.config import FAST as PAIR

    cfg, engine = generate.settings(build_parser().parse_args(["generate", "x", "--fast"]))
    assert engine.cache == PAIR.engine["cache"] and cfg.threshold == PAIR.request["threshold"]
    cfg, engine = generate.settings(build_parser().parse_args(["generate", "x", "--fast", "--factor", "1.5"]))
    assert cfg.factor == 1.5 and cfg.threshold is None and engine.cache == PAIR.engine["cache"]
    cfg, engine = generate.settings(build_parser().parse_args(["generate", "x", "--fast", "--cache", "prefix"]))
    assert engine.cache == "prefix" and cfg.threshold == PAIR.request["threshold"]
    code, out, err = run_cli(capsys, "generate", "Merhaba", "--model", tiny_checkpoint, "--json",
                             "--cache", "prefix", "--threshold", "0.5", *FAST)
    assert code == 0, err
    assert json.loads(out)["forward_passes"] <= 8


def test_stream(capsys, tiny_checkpoint):
    code, out, err = run_cli(capsys, "generate", "Merhaba", "Kitap", "--model", tiny_checkpoint, "--stream",
                             "--json", "--no-early-stop", *FAST)
    assert code == 0, err
    events = [json.loads(x) for x in out.splitlines()]
    assert {e["index"] for e in events if e["finished"]} == {0, 1}
    code, plain, _ = run_cli(capsys, "generate", "Merhaba", "Kitap", "--model", tiny_checkpoint, "--json",
                             "--no-early-stop", *FAST)
    finals = [json.loads(x)["text"] for x in plain.splitlines()]
    for i in (0, 1):
        assert "".join(e["text"] for e in events if e["index"] == i) == finals[i]


def test_stream_with_output_streams_and_writes_the_file(capsys, tmp_path, tiny_checkpoint):
    dst = tmp_path / "answers.jsonl"
    code, out, err = run_cli(capsys, "generate", "Merhaba", "Kitap", "--model", tiny_checkpoint, "--stream",
                             "--json", "--output", str(dst), *FAST)
    assert code == 0, err
    events = [json.loads(x) for x in out.splitlines()]
    rows = [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["Merhaba", "Kitap"]
    for i in (0, 1):
        assert "".join(e["text"] for e in events if e["index"] == i) == rows[i]["text"]


def test_fast_knobs_need_the_engine(capsys, tiny_checkpoint):
    code, _, err = run_cli(capsys, "generate", "x", "--model", tiny_checkpoint, "--reference", "--fast")
    assert code == 2 and "need the engine" in err
    code, _, err = run_cli(capsys, "generate", "x", "--model", tiny_checkpoint, "--reference", "--cuda-graphs")
    assert code == 2 and "need the engine" in err  # never silently ignored
    code, _, err = run_cli(capsys, "generate", "x", "--model", tiny_checkpoint, "--threshold", "1.5")
    assert code == 2 and "threshold must be in (0, 1]" in err


def test_a_failed_engine_step_is_one_line_and_exit_1(monkeypatch, capsys):
    """Not bad input (a device error, out of memory): no traceback either, the cause named, exit 1."""
    from diffutron_engine.cli.main import main
    from diffutron_engine.engine.runner import ModelRunner

    def lost(self, batch):
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(ModelRunner, "execute", lost)
    code = main(["generate", "--model", "tiny-tr", "--max-new-tokens", "4", "--steps", "4", "--block-size", "4", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("diffutron-engine: error: an engine step failed with RuntimeError: device lost second line")
