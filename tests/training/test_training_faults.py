"""Training under bad input and faults: typed configuration from every source, checkpoints verified
before they are trusted (manifest, fallback to the newest intact one), the leftovers of killed saves
and prunes removed, partial metrics lines, LoRA/full mismatches, code-free checkpoint loading, a
diverging run that never saves a poisoned checkpoint, resumed settings that win, and every check made
before the first step."""

import json
import os
import pickle
import shutil

import pytest
import torch

from diffutron_engine import DiffutronError
from diffutron_engine.loading import BUNDLED_MODELS
from diffutron_engine.training import checkpoints as ck
from diffutron_engine.training.config import load_config, parse_value
from diffutron_engine.training.trainer import Trainer, TrainingDiverged, _checkpoints

from test_training import TEXT  # noqa: E402  (the training tests' small run, with its data)
from test_training import _cfg as _training_cfg  # noqa: E402


BUNDLED = BUNDLED_MODELS["tiny-tr"]


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


# seven levels of YAML aliases, ten references each: 10**7 items in about 400 bytes
ALIASES = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
    f"&{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdef", "bcdefg")) + "]"


@pytest.mark.parametrize("key", ["lr", "max_steps", "lora", "model", "lora_targets", "resume"])
def test_a_value_nested_by_yaml_aliases_is_shown_in_a_short_line(tmp_path, key):
    y = tmp_path / "c.yaml"
    y.write_text(f"train_files: a.txt\n{key}: {ALIASES}\n")
    assert len(y.read_bytes()) < 500
    with pytest.raises(DiffutronError) as err:
        load_config(None, str(y))
    assert f"invalid training config: {key} must be" in str(err.value)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)


def test_showing_a_nested_value_reads_only_what_the_line_holds():
    """An error line's value is formatted a few levels and items deep, not in full and then cut: the
    full repr of ten million shared items is tens of megabytes, and costs what it holds."""
    from diffutron_engine.bounded import show

    shown = []

    class Item:
        def __repr__(self):
            shown.append(1)
            return "x"

    nested = [Item()] * 10
    for _ in range(6):
        nested = [nested] * 10
    assert len(show(nested)) < 80 and len(shown) < 1000


def test_resume_settings_nested_by_shared_references_are_shown_in_a_short_line():
    """A checkpoint's settings come from its trainer state, a pickle: shared references nest like YAML
    aliases, and the line naming the settings that cannot change stays short."""
    from types import SimpleNamespace

    nested = [1] * 10
    for _ in range(6):
        nested = [nested] * 10
    cfg = load_config(None, None, {"train_files": ["a.txt"]})
    trainer = SimpleNamespace(cfg=cfg, total_steps=10, _FIXED_ON_RESUME=Trainer._FIXED_ON_RESUME)
    with pytest.raises(DiffutronError) as err:
        Trainer._check_resume_settings(trainer, "ckpt", {"step": 1, "optimizer": {}, "config": {"seed": nested}})
    assert "cannot change on resume: seed 0 (checkpoint: [[[" in str(err.value) and len(str(err.value)) < 500


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
    os.makedirs(tmp_path / "checkpoint-9")  # no manifest: nothing says it is ours, so it stays
    (tmp_path / "checkpoint-9" / "adapter_config.json").write_text("{}")
    logs = []
    Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=2, resume="latest"), log=logs.append)
    left = sorted(os.listdir(tmp_path))
    assert not [n for n in left if n.startswith((".tmp", ".trash"))]
    assert (tmp_path / "checkpoint-9" / "adapter_config.json").read_text() == "{}"
    assert "checkpoint-2" in left and any("cleaned up after interrupted saves" in l for l in logs)


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
    Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=3, resume="latest"), log=lambda s: None)
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
def test_a_new_run_into_a_folder_holding_an_earlier_runs_checkpoints_is_refused(tiny_checkpoint, tmp_path):
    """A new run's saves would be mixed with the earlier run's: pruning (the highest steps kept) would
    delete them and --resume latest would take the earlier run's newest. Refused before any work, and
    again after the start's cleanup finished an earlier save killed before its rename."""
    from test_bad_inputs_training import snapshot

    _train(_cfg(tiny_checkpoint, tmp_path, max_steps=4))  # checkpoints 2 and 4, final
    before = snapshot(str(tmp_path))
    with pytest.raises(DiffutronError) as err:
        Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=2), log=lambda s: None)
    assert str(err.value) == (f"{tmp_path} holds checkpoints of an earlier run (checkpoint-4 and 1 more); resume it "
                              "with --resume latest, or choose another --output-dir (or move them away)")
    assert snapshot(str(tmp_path)) == before
    for step in (2, 4):
        os.replace(tmp_path / f"checkpoint-{step}", tmp_path / f".tmp-checkpoint-{step}-999")
    trainer = Trainer(_cfg(tiny_checkpoint, tmp_path, max_steps=2), log=lambda s: None)  # cleanup: back in place
    with pytest.raises(DiffutronError, match="holds checkpoints of an earlier run \\(checkpoint-4 and 1 more\\)"):
        trainer.train()
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    assert ck.verify(str(tmp_path / "checkpoint-4")) is None


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


# ----------------------------------------------------------------------------------------------- faults
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


# ------------------------------------------------------------------------------------ trainer states
# A trainer_state.pt whose manifest was regenerated (any tool can) verifies: what it unpickles to is then
# checked before use. Each bad state is one line naming the checkpoint and the problem; an explicit
# --resume FOLDER stops there, --resume latest warns and resumes the checkpoint before it.
def _adam(state, key, value):
    return {**state, "optimizer": {**state["optimizer"], "state": {0: {**state["optimizer"]["state"][0], key: value}}}}


def _group(state, **kw):
    groups = [{**g, **kw} for g in state["optimizer"]["param_groups"]]
    return {**state, "optimizer": {**state["optimizer"], "param_groups": groups}}


BAD_STATES = [
    ("a list", lambda s: [1, 2], "its trainer_state.pt holds a list, not a trainer state"),
    ("a tensor", lambda s: torch.ones(2), "its trainer_state.pt holds a tensor of shape (2,), not a trainer state"),
    ("step a string", lambda s: {**s, "step": "abc"}, "has step 'abc', not a non-negative integer"),
    ("step negative", lambda s: {**s, "step": -5}, "has step -5, not a non-negative integer"),
    ("step a bool", lambda s: {**s, "step": True}, "has step True, not a non-negative integer"),
    ("step not the checkpoint's", lambda s: {**s, "step": 10**12}, "says step 1000000000000, but the checkpoint is at "
     "step 4"),
    ("keys missing", lambda s: {"step": 4}, "its trainer_state.pt lacks optimizer, scheduler, rng"),
    ("optimizer a list", lambda s: {**s, "optimizer": [1]}, "has an optimizer state that is [1], not a mapping"),
    ("optimizer groups a string", lambda s: {**s, "optimizer": {"state": {}, "param_groups": "x"}},
     "its optimizer state has another number of parameter groups"),
    ("optimizer lr a string", lambda s: _group(s, lr="abc"), "its optimizer setting lr is 'abc'"),
    ("optimizer betas short", lambda s: _group(s, betas=(0.9,)), "its optimizer setting betas is (0.9,)"),
    ("optimizer moment of another shape", lambda s: _adam(s, "exp_avg", torch.zeros(1)),
     "its optimizer state exp_avg of parameter 0 has shape (1,), the parameter"),
    ("optimizer moment NaN", lambda s: _adam(s, "exp_avg_sq", torch.full_like(s["optimizer"]["state"][0]["exp_avg_sq"],
                                                                               float("nan"))),
     "its optimizer state exp_avg_sq of parameter 0 holds NaN or inf"),
    ("optimizer moment a string", lambda s: _adam(s, "exp_avg", "x"), "its optimizer state exp_avg of parameter 0 is "
     "'x', not a tensor"),
    ("optimizer parameter unknown", lambda s: {**s, "optimizer": {**s["optimizer"], "state": {999: {}}}},
     "its optimizer state names a parameter 999 this run does not have"),
    ("scheduler a string", lambda s: {**s, "scheduler": "x"}, "has a scheduler state that is 'x', not a mapping"),
    ("scheduler foreign key", lambda s: {**s, "scheduler": {**s["scheduler"], "step": 1}},
     "its scheduler state holds 'step', which this scheduler does not have"),
    ("scheduler base_lrs a string", lambda s: {**s, "scheduler": {**s["scheduler"], "base_lrs": "x"}},
     "its scheduler's base_lrs is 'x'"),
    ("scheduler at another step", lambda s: {**s, "scheduler": {**s["scheduler"], "last_epoch": 3}},
     "its scheduler is at step 3, the state says step 4"),
    ("rng of another size", lambda s: {**s, "rng": torch.zeros(5, dtype=torch.uint8)},
     "has a random state that is a tensor of shape (5,), not the generator's 5056 bytes"),
    ("rng invalid", lambda s: {**s, "rng": torch.zeros_like(s["rng"])},
     "its optimizer, scheduler or random state does not load: Invalid mt19937 state"),
    ("config a list", lambda s: {**s, "config": [1]}, "has a config that is not a mapping of settings"),
    ("empty file", b"", "cannot read"),
]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_checkpoint, tmp_path_factory):
    """A run stopped after step 4 of 6: checkpoints 2 and 4."""
    out = tmp_path_factory.mktemp("states") / "run"
    _train(_cfg(tiny_checkpoint, out, max_steps=6), stop_after=4)
    return out


def _forge_state(folder, change) -> None:
    """The trainer state changed (bytes: the file's content) and the manifest regenerated to match."""
    file = os.path.join(folder, ck.STATE)
    if isinstance(change, bytes):
        with open(file, "wb") as f:
            f.write(change)
    else:
        torch.save(change(torch.load(file, weights_only=True)), file)
    os.remove(os.path.join(folder, ck.MANIFEST))
    ck.write_manifest(folder, ck.step_of(folder))


@pytest.mark.needs("peft")
@pytest.mark.parametrize("change, message", [pytest.param(c, m, id=i) for i, c, m in BAD_STATES])
def test_a_bad_trainer_state_is_one_line_and_latest_falls_back(tiny_checkpoint, two_checkpoints, tmp_path, change,
                                                               message):
    from test_bad_inputs_training import snapshot

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    newest = str(out / "checkpoint-4")
    _forge_state(newest, change)
    before = snapshot(str(out))
    with pytest.raises(DiffutronError) as err:
        Trainer(_cfg(tiny_checkpoint, out, max_steps=6, resume=newest), log=lambda s: None).train()
    assert str(err.value).startswith(f"checkpoint {newest} cannot be resumed: ") and message in str(err.value)
    assert "\n" not in str(err.value) and snapshot(str(out)) == before  # nothing set aside, rewritten or removed
    logs = []
    _train(_cfg(tiny_checkpoint, out, max_steps=6, resume="latest"), logs, stop_after=2)
    assert any(l.startswith(f"warning: {newest} cannot be resumed (") and message in l for l in logs), logs
    assert any(l == f"resumed from {out / 'checkpoint-2'} at step 2" for l in logs), logs


@pytest.mark.needs("peft")
def test_latest_sets_aside_a_later_checkpoint_that_fails_verification_whole(tiny_checkpoint, two_checkpoints,
                                                                            tmp_path):
    """The newest checkpoint's manifest names a file outside it: it fails verification, --resume latest
    falls back to checkpoint-2, and the broken checkpoint-4 (not provably ours) is renamed aside with every
    byte kept, instead of blocking the run's save at step 4."""
    import json

    from test_bad_inputs_training import snapshot

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    (out / "outside").write_text("a file beside the checkpoint")
    manifest = json.loads((out / "checkpoint-4" / ck.MANIFEST).read_text())
    manifest["files"]["../outside"] = {"size": 28, "sha256": ck.sha256_file(str(out / "outside"))}
    (out / "checkpoint-4" / ck.MANIFEST).write_text(json.dumps(manifest))
    before = snapshot(str(out / "checkpoint-4"))
    logs = []
    _train(_cfg(tiny_checkpoint, out, max_steps=6, resume="latest"), logs, stop_after=3)
    assert any(l == f"resumed from {out / 'checkpoint-2'} at step 2" for l in logs), logs
    aside = [p for p in os.listdir(out) if p.startswith(".set-aside-checkpoint-4-")]
    assert len(aside) == 1 and snapshot(str(out / aside[0])) == before


@pytest.mark.needs("peft")
def test_latest_with_no_loadable_checkpoint_names_the_oldest_problem(tiny_checkpoint, two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    _forge_state(str(out / "checkpoint-4"), lambda s: {**s, "step": "abc"})
    _forge_state(str(out / "checkpoint-2"), b"")
    with pytest.raises(DiffutronError) as err:
        Trainer(_cfg(tiny_checkpoint, out, max_steps=6, resume="latest"), log=lambda s: None).train()
    assert f"no checkpoint in {out} passes verification and loads (the oldest: cannot read " in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "sub/trainer_state.pt", "..", ".", "",
                                  "a\\b", "nul\0byte"])
def test_a_manifest_names_only_files_inside_its_checkpoint(tmp_path, monkeypatch, name):
    """A forged manifest naming a file elsewhere (with its true size and hash) is refused, and
    verification never reads a file outside the checkpoint."""
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / ck.STATE).write_bytes(b"state")
    (tmp_path / "outside.bin").write_bytes(b"x")
    ck.write_manifest(str(folder), 1)
    manifest = json.load(open(folder / ck.MANIFEST))
    manifest["files"][name] = {"size": 1, "sha256": ck.sha256_file(str(tmp_path / "outside.bin"))}
    (folder / ck.MANIFEST).write_text(json.dumps(manifest))
    read = []
    real = ck.sha256_file
    monkeypatch.setattr(ck, "sha256_file", lambda p, *a: read.append(p) or real(p, *a))
    why = ck.verify(str(folder))
    assert why.startswith("unreadable manifest.json (it names ") and "not a file name inside the checkpoint" in why
    assert read == [] and ck.manifest_step(str(folder)) is None


def test_a_link_inside_a_checkpoint_fails_verification(tmp_path):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (tmp_path / "elsewhere").write_bytes(b"state")
    os.symlink(tmp_path / "elsewhere", folder / ck.STATE)
    ck.write_manifest(str(folder), 1)
    assert ck.verify(str(folder)) == f"{ck.STATE} is a symbolic link"


# ------------------------------------------------------------------------------------ nothing else deleted
def _user_things(out) -> list[str]:
    """A user's files and folders inside an output folder, named like nothing a run writes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "notes.txt").write_text("mine\n")
    (out / "trainer_state.pt").write_bytes(b"not ours")
    for folder in ("my-data", "checkpoint-old", "checkpoints", "final-backup", ".tmp-mine", ".trash-mine"):
        (out / folder).mkdir()
        (out / folder / "config.json").write_text("{}")
    (out / "checkpoint-9").write_text("a file named like a checkpoint, beyond the run's steps")
    return sorted(os.listdir(out))


@pytest.mark.needs("peft")
def test_a_run_and_its_pruning_leave_everything_else_in_output_dir(tiny_checkpoint, tmp_path):
    from test_bad_inputs_training import snapshot

    out = tmp_path / "run"
    mine = _user_things(out)
    before = snapshot(str(out))
    _train(_cfg(tiny_checkpoint, out, max_steps=2, save_every=1, keep_last=1))
    _train(_cfg(tiny_checkpoint, out, max_steps=3, save_every=1, keep_last=1, resume="latest"))
    after = snapshot(str(out))
    assert {k: v for k, v in after.items() if k.split(os.sep)[0] in mine} == before
    assert _names(out) == ["checkpoint-3"]  # 1 and 2 pruned


def test_cleanup_and_remove_touch_only_what_this_package_writes(tmp_path):
    """clean() removes only temporary and trash folders named as this package names them (and holding no
    folder), never a checkpoint-N without a manifest of ours, whatever files it holds; remove() refuses
    anything that is not a checkpoint of ours."""
    debris = tmp_path / "checkpoint-7"
    debris.mkdir()
    (debris / "config.json").write_text("{}")
    (debris / "tokenizer_backup").mkdir()  # named like our tokenizer files, but a user's folder
    (debris / "tokenizer_backup" / "vocab.txt").write_text("mine")
    export = tmp_path / "checkpoint-100"  # a user's save_pretrained export: our file names, no manifest
    export.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (export / name).write_text("mine")
    for leftover in (".tmp-checkpoint-3-77", ".trash-checkpoint-2", ".tmp-final-5", ".trash-final"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_text("partial")
    (tmp_path / ".trash-checkpoint-4").mkdir()  # our name, but holding a folder: not what a prune leaves
    (tmp_path / ".trash-checkpoint-4" / "sub").mkdir()
    (tmp_path / "notes").mkdir()
    acted = ck.clean(str(tmp_path), log=lambda s: None)
    assert sorted(acted) == [".tmp-checkpoint-3-77", ".tmp-final-5", ".trash-checkpoint-2", ".trash-final"]
    assert sorted(os.listdir(tmp_path)) == [".trash-checkpoint-4", "checkpoint-100", "checkpoint-7", "notes"]
    assert (debris / "tokenizer_backup" / "vocab.txt").read_text() == "mine"
    assert sorted(os.listdir(export)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for folder in (debris, export, tmp_path / "notes"):
        with pytest.raises(DiffutronError, match="refusing to delete"):
            ck.remove(str(folder))
        assert folder.is_dir()


def _checkpoint_of_ours(folder, step=1):
    """A checkpoint folder as a save leaves it (a trainer state and a config, then the manifest)."""
    folder.mkdir()
    (folder / ck.STATE).write_bytes(b"state")
    (folder / "config.json").write_text("{}")
    ck.write_manifest(str(folder), step)


@pytest.mark.parametrize("manifest, extra, why", [
    ("{}", "notes.txt", "its manifest.json is not one this package writes"),
    ('{"files": {}}', "notes.txt", "its manifest.json is not one this package writes"),
    ('{"format": 1, "step": 1, "files": {"notes.txt": {"size": 5, "sha256": "x"}}}', "notes.txt",
     "its manifest.json is not one this package writes"),
    (None, "notes.txt", "it holds 'notes.txt', which its manifest.json does not list"),
    (None, "backup/", "it holds 'backup', which its manifest.json does not list"),
])
def test_a_manifest_makes_a_folder_ours_only_when_it_lists_all_the_folder_holds(tmp_path, manifest, extra, why):
    """A file named manifest.json is not enough: it must read as one a save writes (format, step, sizes
    and SHA-256s) and list everything in the folder. Else the folder is not replaced, removed, pruned,
    set aside or counted as an earlier run's."""
    for name in ("final", "checkpoint-1"):
        folder = tmp_path / name
        _checkpoint_of_ours(folder)
        if manifest is not None:
            (folder / ck.MANIFEST).write_text(manifest)
        if extra.endswith("/"):
            (folder / extra).mkdir()
        else:
            (folder / extra).write_text("my notes\n")
        assert ck.replaceable(str(folder)).startswith(why)
        with pytest.raises(DiffutronError, match="refusing to delete"):
            ck.remove(str(folder))
        assert (folder / ck.STATE).read_bytes() == b"state"
    assert ck.ours(str(tmp_path)) == [] and ck.earlier_run(str(tmp_path)) == []
    ck.prune(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "final"]


def test_a_manifest_of_ours_makes_a_folder_ours(tmp_path):
    """What a save writes is ours: replaceable, counted, pruned (the oldest first)."""
    for step in (1, 2):
        _checkpoint_of_ours(tmp_path / f"checkpoint-{step}", step)
    assert ck.replaceable(str(tmp_path / "checkpoint-1")) is None
    assert _names(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    ck.prune(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]


def test_an_older_versions_final_without_a_manifest_is_ours(tmp_path):
    """Older versions wrote final/ without a manifest: one holding only a final model's files (or nothing)
    is replaceable; one holding anything else is not."""
    final = tmp_path / "final"
    final.mkdir()
    assert ck.replaceable(str(final)) is None  # empty: nothing to lose
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "adapter_config.json", "adapter_model.safetensors", "README.md"):
        (final / name).write_text("x")
    assert ck.replaceable(str(final)) is None and ck.older_final(str(final))
    (final / "notes.txt").write_text("mine")
    assert ck.replaceable(str(final)) == "no manifest.json says this package wrote it"
    (final / "notes.txt").unlink()
    (final / ck.STATE).write_bytes(b"a checkpoint's file, not a final model's")
    assert ck.replaceable(str(final)) == "no manifest.json says this package wrote it"
    assert ck.replaceable(str(tmp_path / "checkpoint-1")) is None  # absent
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "config.json").write_text("{}")  # the final rule is for final/ only
    assert ck.replaceable(str(tmp_path / "checkpoint-1")) == "no manifest.json says this package wrote it"


def test_a_new_run_replaces_an_older_versions_final_with_a_warning(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(BUNDLED, out / "final")  # config, weights and tokenizer files: what a final model holds
    logs = []
    res = _train(_cfg("tiny-tr", out, max_steps=1, lora=False, save_every=1), logs)
    assert any(l.startswith(f"warning: {out / 'final'} has no manifest.json (an older version wrote it)")
               for l in logs), logs
    assert res["final_model"] == str(out / "final") and ck.ours_why_not(str(out / "final")) is None


def test_a_diverged_run_exits_1_with_one_line_not_2(monkeypatch, capsys):
    """A diverged run is not bad input: one line and exit 1 (exit 2 says the user's input was wrong)."""
    from diffutron_engine.cli import main as cli

    def diverge(argv):
        raise TrainingDiverged("loss is nan at step 3; stopped without saving. Last good checkpoint: none")

    monkeypatch.setattr(cli, "_dispatch", diverge)
    assert cli.main(["train", "cpt"]) == 1
    err = capsys.readouterr().err
    assert err == "diffutron-engine: error: loss is nan at step 3; stopped without saving. Last good checkpoint: none\n"
