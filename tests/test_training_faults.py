"""Training under bad input and faults: typed configuration from every source, checkpoints verified
before they are trusted (manifest, fallback to the newest intact one), the leftovers of killed saves
and prunes removed, partial metrics lines, LoRA/full mismatches, code-free checkpoint loading, a
diverging run that never saves a poisoned checkpoint, resumed settings that win, and every check made
before the first step."""

import json
import os
import pickle

import pytest
import torch

from diffutron_engine import DiffutronError
from diffutron_engine.training import checkpoints as ck
from diffutron_engine.training.config import load_config, parse_value
from diffutron_engine.training.trainer import Trainer, TrainingDiverged, _checkpoints

from test_training import TEXT  # noqa: E402  (the training tests' small run, with its data)
from test_training import _cfg as _training_cfg  # noqa: E402


def _cfg(model, out, **kw):
    """The training tests' run, 4 steps, keeping 3 checkpoints."""
    return _training_cfg(model, out, **{"max_steps": 4, "keep_last": 3, **kw})


def _train(cfg, logs=None, **kw):
    return Trainer(cfg, log=(logs.append if logs is not None else lambda s: None)).train(**kw)


def _names(out):
    return [os.path.basename(c) for c in _checkpoints(out)]


# ------------------------------------------------------------------------------------ typed configuration
@pytest.mark.parametrize("key, value, expected", [
    ("lr", "1e-4", 1e-4), ("lr", parse_value("1e-4"), 1e-4), ("weight_decay", parse_value("1e-2"), 0.01),
    ("max_steps", "1e3", 1000), ("max_steps", 1_000.0, 1000), ("max_steps", "null", None),
    ("lora_targets", "Wqkv", ["Wqkv"]), ("lora_targets", "Wqkv, Wo", ["Wqkv", "Wo"]),
    ("output_dir", 5, "5"), ("lora", "no", False), ("pack", "True", True), ("batch_size", "8", 8),
])
def test_values_become_their_declared_types(key, value, expected):
    cfg = load_config(None, None, {"train_files": ["x.txt"], key: value})
    assert getattr(cfg, key) == expected and type(getattr(cfg, key)) is type(expected)


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 2.5, "batch_size must be an integer, got 2.5"),
    ("grad_accum", 1.5, "grad_accum must be an integer, got 1.5"),
    ("lora_r", 4.5, "lora_r must be an integer, got 4.5"),
    ("max_steps", 2.5, "max_steps must be an integer, got 2.5"),
    ("lr", "fast", "lr must be a number, got 'fast'"),
    ("lr", -1, "lr must be a number > 0"),
    ("lr", float("inf"), "lr must be a number (finite)"),
    ("lora", "maybe", "lora must be true or false, got 'maybe'"),
    ("lora_targets", {"a": 1}, "lora_targets must be a list of strings"),
    ("output_dir", ["a"], "output_dir must be a string"),
    ("warmup_ratio", 1.0, "warmup_ratio must be a number in [0, 1)"),
    ("seed", -3, "seed must be an integer in [0, 2**63)"),
    ("objective", "gpt", "objective must be one of mlm, mdlm"),
    ("learning_rate", 1e-4, "unknown setting(s): learning_rate"),
    ("lr_", 1e-4, "did you mean lr?"),
])
def test_bad_values_name_the_field_the_value_and_what_is_allowed(key, value, message):
    with pytest.raises(DiffutronError) as err:
        load_config(None, None, {"train_files": ["x.txt"], key: value})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_yaml_file_numbers_in_any_spelling(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 2e-4\nweight_decay: 1e-2\nmax_steps: 1e2\nlora_targets: Wqkv,Wo\ntrain_files: a.txt\n")
    cfg = load_config(None, str(y))
    assert (cfg.lr, cfg.weight_decay, cfg.max_steps, cfg.lora_targets, cfg.train_files) == \
        (2e-4, 0.01, 100, ["Wqkv", "Wo"], ["a.txt"])


# ------------------------------------------------------------------------------------ checkpoints
@pytest.mark.needs("peft")
def test_checkpoints_carry_a_manifest_that_verifies(tiny_checkpoint, tmp_path):
    _train(_cfg(tiny_checkpoint, tmp_path))
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    for c in _checkpoints(tmp_path):
        manifest = json.load(open(os.path.join(c, ck.MANIFEST)))
        assert ck.STATE in manifest["files"] and ck.verify(c) is None
        for name, meta in manifest["files"].items():
            assert os.path.getsize(os.path.join(c, name)) == meta["size"]


def _zero_a_megabyte(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(max(0, size // 2 - (1 << 19)))
        f.write(b"\0" * min(size, 1 << 20))


@pytest.mark.needs("peft")
def test_resume_falls_back_to_the_newest_intact_checkpoint(tiny_checkpoint, tmp_path):
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=6), stop_after=4)  # checkpoints 2 and 4
    weights = os.path.join(tmp_path, "checkpoint-4", "adapter_model.safetensors")
    with open(weights, "r+b") as f:  # truncated, as a kill mid-copy or a full disk leaves it
        f.truncate(os.path.getsize(weights) // 2)
    logs = []
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=6, resume="latest"), logs, stop_after=5)
    assert any("checkpoint-4 fails verification" in l and "truncated" in l for l in logs)
    assert any("resumed from" in l and l.endswith("at step 2") for l in logs)
    # the same with silent corruption: a megabyte of zeros inside the weights of every checkpoint
    for c in _checkpoints(tmp_path):
        _zero_a_megabyte(os.path.join(c, ck.STATE))
    with pytest.raises(DiffutronError, match="no checkpoint in .* passes verification"):
        Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=6, resume="latest"), log=lambda s: None).train()
    with pytest.raises(DiffutronError, match="checkpoint-2 fails verification: .*SHA-256"):
        Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=6, resume=str(tmp_path / "checkpoint-2")),
                log=lambda s: None).train()


@pytest.mark.needs("peft")
def test_leftovers_of_killed_saves_and_prunes_are_removed_at_start(tiny_checkpoint, tmp_path):
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=2))
    os.makedirs(tmp_path / ".tmp-checkpoint-6-1234")  # a save killed before its rename
    (tmp_path / ".tmp-checkpoint-6-1234" / "model.safetensors").write_bytes(b"partial")
    os.makedirs(tmp_path / ".trash-checkpoint-1")  # a prune killed before its delete finished
    os.makedirs(tmp_path / "checkpoint-9")  # an older version's half-deleted checkpoint
    (tmp_path / "checkpoint-9" / "adapter_config.json").write_text("{}")
    logs = []
    Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=2), log=logs.append)
    left = sorted(os.listdir(tmp_path))
    assert not [n for n in left if n.startswith((".tmp", ".trash"))] and "checkpoint-9" not in left
    assert "checkpoint-2" in left and any("leftovers" in l for l in logs)


@pytest.mark.needs("peft")
def test_pruning_renames_before_deleting(tiny_checkpoint, tmp_path, monkeypatch):
    """A kill in the middle of a prune (here: rmtree fails on the trash) leaves no checkpoint-N folder
    without its files: the old checkpoint was renamed away first."""
    import shutil

    real = shutil.rmtree

    def killed(path, *a, **k):
        if os.path.basename(str(path)).startswith(".trash-"):
            return None  # the process "dies" before deleting anything
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed)
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=3, save_every=1, keep_last=1))
    assert _names(tmp_path) == ["checkpoint-3"]
    assert all(ck.verify(c) is None for c in ck.checkpoint_folders(tmp_path))
    # the pruned ones were renamed away before the (killed) delete, and the next start removes them
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".trash-")) == [".trash-checkpoint-1",
                                                                                ".trash-checkpoint-2"]
    monkeypatch.setattr(shutil, "rmtree", real)
    Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=3), log=lambda s: None)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".trash-")]


@pytest.mark.needs("peft")
def test_folders_that_are_not_ours_are_never_removed_nor_pruned(tiny_checkpoint, tmp_path):
    """Another trainer's checkpoint-N (files this package never writes) survives cleanup and pruning."""
    foreign = tmp_path / "checkpoint-100"
    foreign.mkdir(parents=True)
    for name in ("trainer_state.json", "optimizer.pt", "training_args.bin"):
        (foreign / name).write_bytes(b"x")
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4, save_every=1, keep_last=1))
    assert sorted(os.listdir(foreign)) == ["optimizer.pt", "trainer_state.json", "training_args.bin"]
    assert _names(tmp_path) == ["checkpoint-4"]


@pytest.mark.needs("peft")
def test_a_complete_save_killed_before_its_rename_is_recovered(tiny_checkpoint, tmp_path):
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4), stop_after=2)
    os.replace(tmp_path / "checkpoint-2", tmp_path / ".tmp-checkpoint-2-999")  # killed between the renames
    logs = []
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4, resume="latest"), logs)
    assert any("a complete save killed before its rename" in l for l in logs)
    assert any(l.endswith("at step 2") and "resumed from" in l for l in logs)


@pytest.mark.needs("peft")
def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tiny_checkpoint, tmp_path):
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=6), stop_after=4)  # checkpoints 2 and 4
    logs = []
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=6, resume=str(tmp_path / "checkpoint-2")), logs, stop_after=3)
    assert _names(tmp_path) == ["checkpoint-2"]  # checkpoint-4 was the abandoned run's: never mixed in
    assert [n for n in os.listdir(tmp_path) if n.startswith(".set-aside-checkpoint-4-")]
    assert any("set aside" in l for l in logs)


@pytest.mark.needs("peft")
def test_an_older_versions_checkpoint_resumes_with_a_warning(tiny_checkpoint, tmp_path):
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4), stop_after=2)
    os.remove(tmp_path / "checkpoint-2" / ck.MANIFEST)
    logs = []
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4, resume=str(tmp_path / "checkpoint-2")), logs, stop_after=3)
    assert any("no manifest" in l and "resumed unverified" in l for l in logs)


@pytest.mark.needs("peft")
def test_cli_resume_keeps_the_checkpoints_settings_and_refuses_data_changes(tiny_checkpoint, tmp_path, capsys):
    """`train --resume latest` alone continues with the run's own settings (not the defaults); a setting
    that decides the steps' data is refused with what to do; lr may change and is printed."""
    from diffutron_engine.cli.main import main

    out = str(tmp_path / "run")
    first = ["train", "cpt", "--model", tiny_checkpoint, "--data", TEXT, "--output-dir", out, "--max-steps", "2",
             "--batch-size", "4", "--max-length", "32", "--lr", "1e-3", "--save-every", "1", "--lora-r", "4",
             "--objective", "mdlm", "--seed", "3"]
    assert main(first) == 0
    capsys.readouterr()
    assert main(["train", "cpt", "--output-dir", out, "--resume", "latest", "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "max_steps 3 (checkpoint: 2)" in err and "lr " not in err.split("resumed")[0]
    assert main(["train", "cpt", "--output-dir", out, "--resume", "latest", "--max-steps", "4",
                 "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot change on resume: batch_size 2 (checkpoint: 4)" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "cpt", "--output-dir", out, "--resume", "latest", "--max-steps", "4", "--lr", "5e-4"]) == 0
    assert "lr 0.0005 (checkpoint: 0.001)" in capsys.readouterr().err


@pytest.mark.needs("peft")
def test_any_seed_the_config_accepts_trains(tiny_checkpoint, tmp_path):
    res = _train(_cfg(tiny_checkpoint, tmp_path, max_steps=1, seed=2**63 - 1))
    assert res["steps"] == 1


@pytest.mark.needs("peft")
def test_partial_metrics_line_is_dropped_on_resume(tiny_checkpoint, tmp_path):
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4), stop_after=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # killed mid-write
    logs = []
    res = _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4, resume="latest"), logs)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4] and res["loss_curve"]
    assert any("dropped 1 incomplete line" in l for l in logs)


@pytest.mark.needs("peft")
def test_resume_with_the_other_lora_choice_is_refused(tiny_checkpoint, tmp_path):
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4), stop_after=2)
    with pytest.raises(DiffutronError, match="trained LoRA adapters; resume it with --lora"):
        Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=4, lora=False, resume="latest"), log=lambda s: None).train()


@pytest.mark.needs("peft")
def test_trainer_state_cannot_run_code(tiny_checkpoint, tmp_path):
    """torch.load(weights_only=True): a crafted trainer_state.pt whose manifest was forged to match is
    refused, and its payload never runs."""
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4), stop_after=2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = os.path.join(tmp_path, "checkpoint-2", ck.STATE)
    with open(state, "wb") as f:
        pickle.dump({"step": 2, "x": Payload()}, f)
    os.remove(os.path.join(tmp_path, "checkpoint-2", ck.MANIFEST))
    ck.write_manifest(os.path.join(tmp_path, "checkpoint-2"), 2)
    with pytest.raises(DiffutronError, match="cannot read .*trainer_state.pt"):
        Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=4, resume="latest"), log=lambda s: None).train()
    assert not marker.exists()


# ------------------------------------------------------------------------------------ faults (issue 14)
def test_a_diverging_run_never_saves_a_poisoned_checkpoint(tiny_checkpoint, tmp_path):
    """Two sane steps, then resumed with lr 1e9: the flag wins (printed), the run stops before saving
    exploded weights, and the checkpoint it names scores a finite perplexity."""
    from diffutron_engine.loading import load_tokenizer
    from diffutron_engine.training.dataset import read_texts
    from diffutron_engine.training.evaluate import masked_lm_perplexity

    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=2, save_every=1, lora=False))
    logs = []
    with pytest.raises(TrainingDiverged) as err:
        _train(_cfg(tiny_checkpoint, tmp_path, max_steps=8, save_every=1, lora=False, lr=1e9, resume="latest"), logs)
    assert any("lr 1000000000.0 (checkpoint: 0.001)" in l for l in logs)
    msg = str(err.value)
    named = msg.split("Last good checkpoint: ")[1].split(" ")[0]
    assert os.path.isdir(named) and ck.verify(named) is None and "--set lr=" in msg
    assert _names(tmp_path)[-1] == os.path.basename(named)  # nothing after it was saved
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(named, dtype=torch.float32)
    res = masked_lm_perplexity(model, load_tokenizer(named), read_texts([TEXT])[:20], max_length=32)
    assert res["perplexity"] < float("inf")


@pytest.mark.needs("peft")
def test_resume_behind_the_checkpoint_is_an_error_before_any_step(tiny_checkpoint, tmp_path):
    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4))
    with pytest.raises(DiffutronError, match="at step 4, past this run's last step 2 .*raise --max-steps above 4"):
        Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=2, resume="latest"), log=lambda s: None).train()


@pytest.mark.needs("peft")
def test_what_a_run_needs_is_checked_before_the_first_step(tiny_checkpoint, tmp_path):
    with pytest.raises(DiffutronError, match="missing.txt"):
        Trainer(_cfg(tiny_checkpoint, tmp_path / "a", eval_files=[str(tmp_path / "missing.txt")]), log=print)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiffutronError, match="is not a writable folder"):
        Trainer(_cfg(tiny_checkpoint, tmp_path / "file" / "out"), log=print)
    nan_model = tmp_path / "nan-model"
    from transformers import AutoModelForMaskedLM

    m = AutoModelForMaskedLM.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        m.model.layers[0].mlp.Wo.weight[0, 0] = float("nan")
    m.save_pretrained(nan_model)
    import shutil

    for f in os.listdir(tiny_checkpoint):
        if f.startswith(("tokenizer", "special")):
            shutil.copy(os.path.join(tiny_checkpoint, f), nan_model)
    with pytest.raises(DiffutronError, match="broken weights: .*layers.0.mlp.Wo.weight holds 1 NaN"):
        Trainer(_cfg(str(nan_model), tmp_path / "b"), log=print)


def test_train_resolves_the_bundled_model_name(tmp_path):
    res = _train(_cfg("tiny-tr", tmp_path, max_steps=1, lora=False, save_every=1))
    assert res["steps"] == 1 and os.path.isfile(tmp_path / "final" / "config.json")
