"""The training path: config, data layout, objectives, the fused loss against a plain one, LoRA on the
real configuration, checkpoints (atomic, keep-last, resume = uninterrupted), NaN stop, merge, and
torchrun with 2 CPU processes = 1 process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffutron_engine import DiffutronError
from diffutron_engine.training.config import PRESETS, TrainConfig, load_config
from diffutron_engine.training.dataset import collate, cpt_examples, sft_examples
from diffutron_engine.training.objectives import mask_batch
from diffutron_engine.training.merge import merge_lora
from diffutron_engine.training.trainer import MaskedLMLoss, Trainer, TrainingDiverged, _checkpoints
from where import ROOT

TEXT = os.path.join(ROOT, "training", "data", "tr", "heldout.txt")


def _cfg(model, out, **kw):
    base = dict(model=model, output_dir=str(out), train_files=[TEXT], max_length=32, batch_size=4, max_steps=6,
                lr=1e-3, lora_r=4, lora_alpha=8, save_every=2, keep_last=2, log_every=1, objective="mdlm", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


# ----------------------------------------------------------------------------------------------- config
def test_config_layers_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("task: sft\nlr: 3.0e-5\ntrain_files: [a.jsonl]\n")
    cfg = load_config("paper-sft-1", str(y), {"batch_size": 2})
    assert (cfg.task, cfg.lr, cfg.batch_size, cfg.epochs, cfg.objective) == ("sft", 3e-5, 2, 20.0, "mdlm")
    paper = load_config("paper-cpt", None, {"train_files": ["x.txt"]})
    assert (paper.lora_r, paper.lora_alpha, paper.optimizer, paper.batch_size * paper.grad_accum) == \
        (256, 256, "paged_adamw_8bit", 128)
    with pytest.raises(DiffutronError, match="unknown setting"):
        load_config(None, None, {"train_files": ["x"], "learning_rate": 1})
    with pytest.raises(DiffutronError, match="unknown preset"):
        load_config("nope")
    with pytest.raises(DiffutronError, match="no training data"):
        TrainConfig()
    with pytest.raises(DiffutronError, match="decoder"):
        TrainConfig(train_files=["x"], lora_targets=["decoder"])
    with pytest.raises(DiffutronError, match="not found"):
        load_config(None, str(tmp_path / "missing.yaml"))
    assert set(PRESETS) >= {"paper-cpt", "paper-sft-1", "paper-sft-2", "tiny-tr"}


@pytest.mark.needs("peft")
def test_lora_on_the_real_configuration_counts_the_papers_parameters():
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from diffutron_engine.models.random_weights import MMBERT_BASE
    from diffutron_engine.training.trainer import apply_lora, count_parameters

    with torch.device("meta"):  # the real architecture without allocating its weights
        model = ModernBertForMaskedLM(ModernBertConfig(**MMBERT_BASE))
    trainable, total = count_parameters(apply_lora(model, TrainConfig(train_files=["x"])))
    assert trainable == 54_067_200 and total == 361_853_440
    assert round(100 * trainable / total, 2) == 14.94


# ----------------------------------------------------------------------------------------------- data
def test_sft_layout(tiny):
    tok = tiny.tokenizer
    rows = [{"instruction": "Başkent neresi?", "input": "Türkiye", "output": "Ankara."},
            {"messages": [{"role": "user", "content": "Merhaba"}, {"role": "assistant", "content": "Selam!"}]}]
    ex, skipped = sft_examples(rows, tok, max_length=48)
    assert skipped == 0 and all(e.ids.numel() == 48 for e in ex)
    first = ex[0]
    n_prompt = int((~first.maskable).sum())
    prompt_text = tok.decode(first.ids[:n_prompt])
    assert "[Question]" in prompt_text and "Türkiye" in prompt_text and prompt_text.endswith("[Answer]\n")
    assert first.maskable[n_prompt:].all()  # answer, end-of-turn and the EOS tail are all trained
    assert first.ids[-1].item() == tok.eos_token_id
    assert "Ankara." in tok.decode(first.ids[n_prompt:]) and "[/Answer]" in tok.decode(first.ids[n_prompt:])
    with pytest.raises(DiffutronError, match="instruction/input/output"):
        sft_examples([{"question": "x"}], tok, 48)


def test_cpt_packing_and_masks(tiny):
    tok = tiny.tokenizer
    docs = ["Bir iki üç dört beş.", "Altı yedi sekiz.", "Dokuz on."] * 5
    packed = cpt_examples(docs, tok, max_length=16, pack=True)
    assert all(e.ids.numel() <= 16 for e in packed) and packed[0].ids.numel() == 16
    assert all(e.ids[0] == tok.bos_token_id and e.ids[-1] == tok.eos_token_id for e in packed)
    assert not any(e.maskable[[0, -1]].any() for e in packed)  # special tokens never masked
    ids, att, maskable = collate(packed[:3], tok.pad_token_id)
    a = mask_batch(ids, maskable, [7, 8, 9], 0, 1, "mdlm", tok.mask_token_id, 0.15, 1e-3)
    b = mask_batch(ids[1:], maskable[1:], [8, 9], 0, 1, "mdlm", tok.mask_token_id, 0.15, 1e-3)
    assert torch.equal(a[1][1:], b[1]) and torch.equal(a[2][1:], b[2])  # per-example draws
    assert not (a[1] & ~maskable).any() and (a[2] >= 1).all()  # weights 1/t >= 1


def test_fused_loss_equals_the_plain_loss(tiny):
    model = tiny.model
    tok = tiny.tokenizer
    ex = cpt_examples(["Bir iki üç dört beş altı yedi."] * 4, tok, max_length=12, pack=False)
    ids, att, maskable = collate(ex, tok.pad_token_id)
    inputs, masked, weights = mask_batch(ids, maskable, [0, 1, 2, 3], 0, 0, "mdlm", tok.mask_token_id, 0.15, 1e-3)
    row_w = weights[:, None].expand_as(masked)[masked]
    fused = MaskedLMLoss(model)(inputs, att, masked, ids[masked], row_w, 10.0)
    logits = model(input_ids=inputs, attention_mask=att).logits[masked]
    plain = (torch.nn.functional.cross_entropy(logits, ids[masked], reduction="none") * row_w).sum() / 10.0
    assert torch.allclose(fused, plain, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- runs
@pytest.mark.needs("peft")
def test_resume_continues_the_uninterrupted_loss_curve(tiny_checkpoint, tmp_path):
    full = Trainer(_cfg(tiny_checkpoint, tmp_path / "a"), log=lambda s: None).train()
    assert full["steps"] == 6 and os.path.isdir(full["final_model"])
    assert [os.path.basename(c) for c in _checkpoints(tmp_path / "a")] == ["checkpoint-4", "checkpoint-6"]
    Trainer(_cfg(tiny_checkpoint, tmp_path / "b"), log=lambda s: None).train(stop_after=3)  # "killed" at 3
    assert [os.path.basename(c) for c in _checkpoints(tmp_path / "b")] == ["checkpoint-2"]
    Trainer(_cfg(tiny_checkpoint, tmp_path / "b", resume="latest"), log=lambda s: None).train()
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert os.path.exists(tmp_path / "a" / "loss.png")
    assert not [n for n in os.listdir(tmp_path / "b") if n.startswith(".tmp")]  # no half-written folder


@pytest.mark.needs("peft")
def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = MaskedLMLoss.forward

    def poisoned(self, *args):
        calls["n"] += torch.is_grad_enabled()  # training forwards only (not the pre-save health probe)
        loss = real(self, *args)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(MaskedLMLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="step 4.*checkpoint-2"):
        Trainer(_cfg(tiny_checkpoint, tmp_path), log=lambda s: None).train()
    assert [os.path.basename(c) for c in _checkpoints(tmp_path)] == ["checkpoint-2"]
    assert os.path.isfile(tmp_path / "checkpoint-2" / "adapter_model.safetensors")


@pytest.mark.needs("peft")
def test_merge_gives_a_plain_checkpoint_with_the_adapters_outputs(tiny_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    from diffutron_engine.loading import load_model

    res = Trainer(_cfg(tiny_checkpoint, tmp_path / "run", max_steps=2), log=lambda s: None).train()
    merged = merge_lora(res["final_model"], str(tmp_path / "merged"))
    lm = load_model(merged, dtype="float32", device="cpu")
    assert not any("lora" in n for n, _ in lm.model.named_parameters())
    base = AutoModelForMaskedLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, res["final_model"]).eval()
    x = torch.tensor([[2, 10, 11, 4, 12, 1]])
    with torch.no_grad():
        assert torch.allclose(lm.model(input_ids=x).logits, peft_model(input_ids=x).logits, atol=1e-5)
    with pytest.raises(DiffutronError, match="not a LoRA adapter"):
        merge_lora(str(tmp_path), str(tmp_path / "x"))


def test_cli_train_and_bad_config(tiny_checkpoint, tmp_path):
    from diffutron_engine.cli.main import main

    code = main(["train", "sft", "--model", tiny_checkpoint, "--data", str(tmp_path / "missing.jsonl"),
                 "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert main(["train", "cpt", "--set", "lr"]) == 2


@pytest.mark.slow
@pytest.mark.needs("peft")
def test_torchrun_two_processes_match_one_process(tiny_checkpoint, tmp_path):
    """Global batch 8: one process with batch 8, then two gloo processes with batch 4 each."""
    common = ["train", "cpt", "--model", tiny_checkpoint, "--data", TEXT, "--max-length", "32", "--max-steps", "4",
              "--lr", "1e-3", "--lora-r", "4", "--lora-alpha", "8", "--log-every", "1", "--save-every", "100",
              "--objective", "mdlm", "--seed", "5"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    one = subprocess.run([sys.executable, "-m", "diffutron_engine.cli.main", *common, "--batch-size", "8",
                          "--output-dir", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "diffutron_engine.cli.main", *common,
                          "--batch-size", "4", "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es)" in two.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.needs("pyarrow")
def test_cpt_reads_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffutron_engine.training.dataset import read_records

    (tmp_path / "a.jsonl").write_text('{"text": "Bir"}\n\n{"text": "İki"}\n')
    pq.write_table(pa.table({"text": ["Üç", "Dört"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("Beş\n\nAltı\n")
    recs = read_records([str(tmp_path / n) for n in ("a.jsonl", "b.parquet", "c.txt")])
    assert [r if isinstance(r, str) else r["text"] for r in recs] == ["Bir", "İki", "Üç", "Dört", "Beş", "Altı"]
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(DiffutronError, match="bad.jsonl:1"):
        read_records([str(tmp_path / "bad.jsonl")])
    with pytest.raises(DiffutronError, match="unknown data format"):
        read_records([str(_touch(tmp_path / "d.csv"))])


def _touch(path):
    path.write_text("x")
    return path


def test_sft_run_and_eval_through_the_cli(tiny_checkpoint, tmp_path, capsys):
    from diffutron_engine.cli.main import main

    rows = [{"instruction": f"Soru {i}?", "input": "", "output": f"Cevap {i}."} for i in range(8)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    code = main(["train", "sft", "--model", tiny_checkpoint, "--data", str(data), "--output-dir", str(tmp_path / "o"),
                 "--no-lora", "--max-steps", "2", "--batch-size", "4", "--max-length", "40", "--log-every", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and os.path.isfile(os.path.join(result["final_model"], "model.safetensors"))
    assert main(["eval", "perplexity", "--model", result["final_model"], "--data", TEXT, "--max-length", "64",
                 "--max-sequences", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"perplexity", "accuracy", "tokens"} <= set(report) and report["tokens"] > 0


@pytest.mark.parametrize("lora", [pytest.param(True, id="lora", marks=pytest.mark.needs("peft")),
                                  pytest.param(False, id="full")])
@pytest.mark.slow
def test_torchrun_fsdp_matches_one_process(tiny_checkpoint, tmp_path, lora):
    """FSDP2 (parameters sharded per layer) over 2 gloo processes: the 1-process loss curve, and a final
    checkpoint written from the gathered full state dict."""
    common = ["train", "cpt", "--model", tiny_checkpoint, "--data", TEXT, "--max-length", "32", "--max-steps", "3",
              "--lr", "1e-3", "--lora-r", "4", "--lora-alpha", "8", "--log-every", "1", "--save-every", "100",
              "--objective", "mdlm", "--seed", "5", "--lora" if lora else "--no-lora"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    one = subprocess.run([sys.executable, "-m", "diffutron_engine.cli.main", *common, "--batch-size", "8",
                          "--output-dir", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29519" if lora else "29521", "-m", "diffutron_engine.cli.main", *common,
                          "--batch-size", "4", "--strategy", "fsdp", "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), rel=1e-4)
    from safetensors.torch import load_file

    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = (load_file(str(tmp_path / run / "final" / weights)) for run in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
