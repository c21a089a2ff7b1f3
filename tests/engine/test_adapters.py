"""A LoRA adapter used without merging it on disk: load_model(base, adapter=...) and `generate --adapter`
give what the checkpoint `train merge` writes gives, and every wrong adapter or base is one line."""

import json
import os
import shutil

import pytest
import torch

from diffutron_engine import DiffutronError
from diffutron_engine.loading import BUNDLED_MODELS, load_model
from where import ROOT

TEXT = os.path.join(ROOT, "training", "data", "tr", "heldout.txt")
GEN = ["--seed", "3", "--max-new-tokens", "16", "--steps", "16", "--block-size", "16", "--device", "cpu",
       "--json", "Merhaba", "Türkiye'nin başkenti"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(a LoRA CPT adapter trained 2 steps on tiny-tr, the checkpoint `train merge` makes of it)."""
    pytest.importorskip("peft")
    from diffutron_engine.training.config import TrainConfig
    from diffutron_engine.training.merge import merge_lora
    from diffutron_engine.training.trainer import Trainer

    out = tmp_path_factory.mktemp("adapter")
    cfg = TrainConfig(model="tiny-tr", output_dir=str(out / "run"), train_files=[TEXT], max_length=32, batch_size=4,
                      max_steps=2, lr=1e-2, lora_r=4, lora_alpha=8, save_every=100, log_every=1, objective="mdlm",
                      seed=3)
    adapter = Trainer(cfg, log=lambda s: None).train()["final_model"]
    return adapter, merge_lora(adapter, str(out / "merged"))


def _cli(capsys, *argv):
    from diffutron_engine.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.needs("peft")
def test_adapter_gives_the_merged_checkpoints_logits(run):
    adapter, merged = run
    assert not os.path.isfile(os.path.join(adapter, "config.json"))  # an adapter folder, no model of its own
    m = load_model(merged, dtype="float32", device="cpu")
    x = torch.tensor([[2, 10, 11, 4, 12, 1, 30, 31]])
    with torch.no_grad():
        want = m.model(input_ids=x).logits
        base = load_model("tiny-tr", dtype="float32", device="cpu").model(input_ids=x).logits
    assert not torch.equal(want, base)  # the adapter changes the model
    # the same float32 arithmetic as `train merge` (base loaded in float32, peft's merge): bit for bit
    for lm in (load_model("tiny-tr", dtype="float32", device="cpu", adapter=adapter),
               load_model(adapter, dtype="float32", device="cpu")):  # the base from adapter_config.json
        assert not any("lora" in n for n, _ in lm.model.named_parameters())
        assert lm.tokenizer.get_vocab() == m.tokenizer.get_vocab()
        with torch.no_grad():
            assert torch.equal(lm.model(input_ids=x).logits, want)


@pytest.mark.needs("peft")
def test_generate_with_adapter_equals_generate_with_the_merged_model(run, capsys):
    from diffutron_engine.config import EngineConfig, SamplingParams
    from diffutron_engine.engine import Engine

    adapter, merged = run
    code, want, err = _cli(capsys, "generate", "--model", merged, *GEN)
    assert code == 0, err
    for flags in (("--model", "tiny-tr", "--adapter", adapter), ("--adapter", adapter)):
        code, got, err = _cli(capsys, "generate", *flags, *GEN)
        assert code == 0, err
        assert [json.loads(line)["text"] for line in got.splitlines()] == \
            [json.loads(line)["text"] for line in want.splitlines()]
    cfg = EngineConfig(device="cpu", dtype="float32")
    params = SamplingParams(max_new_tokens=16, steps=16, block_size=16, seed=5)
    a = Engine.from_pretrained(None, cfg, adapter=adapter).generate(["Merhaba"], params)[0]
    b = Engine.from_pretrained(merged, cfg).generate(["Merhaba"], params)[0]
    assert a.token_ids == b.token_ids


def _one_line(code, err):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("diffutron-engine: error: "), err
    return lines[0]


@pytest.mark.needs("peft")
def test_wrong_adapters_and_bases_are_one_line(run, tmp_path, capsys):
    from diffutron_engine.models.random_weights import build_random_checkpoint

    adapter, _ = run
    other = build_random_checkpoint(str(tmp_path / "other"), size="tiny")  # another vocabulary
    with pytest.raises(DiffutronError, match=r"has a vocabulary of 664 tokens, the adapter's base .* one of .*"
                                             f"the adapter {adapter} was trained on another model"):
        load_model(other, dtype="float32", device="cpu", adapter=adapter)
    line = _one_line(*_cli(capsys, "generate", "--model", other, "--adapter", adapter, *GEN)[::2])
    assert "vocabulary" in line and other in line and adapter in line

    not_adapter = tmp_path / "plain"
    not_adapter.mkdir()
    for cmd in ("generate", "serve"):  # checked before any model loads
        line = _one_line(*_cli(capsys, cmd, "--adapter", str(not_adapter), *(GEN if cmd == "generate" else ()))[::2])
        assert line.endswith(f"--adapter '{not_adapter}' is not a LoRA adapter (no adapter_config.json)")
        line = _one_line(*_cli(capsys, cmd, "--adapter", str(tmp_path / "none"),
                               *(GEN if cmd == "generate" else ()))[::2])
        assert line.endswith(f"--adapter '{tmp_path / 'none'}' does not exist")
    with pytest.raises(DiffutronError, match="is not a LoRA adapter"):
        load_model("tiny-tr", device="cpu", adapter=str(not_adapter))

    # an adapter of other target modules (another architecture's names): it does not fit, naming both
    foreign = tmp_path / "foreign"
    shutil.copytree(adapter, foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(DiffutronError, match=f"the adapter {foreign} does not fit the base model 'tiny-tr'"):
        load_model("tiny-tr", dtype="float32", device="cpu", adapter=str(foreign))
    # an adapter that names no base, given without one
    del config["base_model_name_or_path"]
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(DiffutronError, match="names no base model"):
        load_model(str(foreign), device="cpu")
    assert BUNDLED_MODELS["tiny-tr"]  # the bundled base is untouched by all this


@pytest.mark.needs("peft", "fastapi", "uvicorn")
def test_serve_with_adapter_names_it(run):
    from serve_util import AUTH, Server

    adapter, _ = run
    server = Server("--adapter", adapter, "--device", "cpu")
    try:
        status, answer = server.post("/v1/completions", {"prompt": "Merhaba", "max_tokens": 8, "seed": 7, "steps": 8,
                                                         "block_size": 8}, AUTH)
        assert status == 200, answer
        assert answer["model"] == adapter and isinstance(answer["choices"][0]["text"], str)
    finally:
        assert server.stop() == 0, server.log
