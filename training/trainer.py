"""The training loop: CPT and SFT of ModernBERT masked LMs, LoRA or full, one process or torchrun (DDP).

The loss never materializes [N, V] logits: the encoder runs on the rows, the MLM head transform only on
the masked positions, and the fused linear cross-entropy (kernels/cross_entropy.py) takes those hidden
states and the decoder weight (tied to the embeddings) straight to the loss and its gradients.

Reproducibility: the examples of optimizer step s, their masks and the loss normalization depend only
on (seed, s), not on the number of processes or on interruptions, so `--resume` continues the loss
curve of an uninterrupted run and `torchrun --nproc_per_node N` gives the curve of one process with
the same global batch (global batch = batch_size x grad_accum x processes).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from ..bounded import show as _show
from ..errors import DiffutronError, RunFailed
from ..outputs import check_file_output, write_file
from . import checkpoints as ck
from .config import MAX_STEPS, TrainConfig, first_line
from .dataset import collate, cpt_examples, epoch_order, read_records, read_texts, sft_examples
from .objectives import mask_batch
from .resume_checks import expected_step, optimizer_problem, scheduler_problem, state_problem


class TrainingDiverged(RunFailed):
    """The loss or the weights went non-finite or exploded: the run stops without saving, naming the last
    good checkpoint. Not bad input, so the command exits 1."""


class BadCheckpoint(DiffutronError):
    """A checkpoint that cannot be resumed: it fails verification, or what it holds is not what a save
    writes. `--resume latest` then tries the one before it (with a warning); an explicit folder is
    refused with this one line."""

    def __init__(self, path: str, why: str, kind: str = "cannot be resumed"):
        self.path, self.why, self.kind = path, why, kind
        super().__init__(f"checkpoint {path} {kind}: {why}; resume another one (--resume latest picks the newest "
                         "intact one)")


# ----------------------------------------------------------------------------------------------- model
class MaskedLMLoss(torch.nn.Module):
    """forward(ids, attention_mask, masked, targets, weights, denominator) -> loss, through the fused
    linear cross-entropy on the masked positions only. A module of its own so that DDP wraps it and its
    forward (the one DDP sees) is the whole loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # the MaskedLM under a peft wrapper (same modules, kept out of the module tree)
        object.__setattr__(self, "mlm", model.get_base_model() if hasattr(model, "get_base_model") else model)
        self._ops = None  # the cross-entropy's backend (backends.Ops), selected on the first batch's device
        if getattr(self.mlm.config, "model_type", None) != "modernbert":
            raise DiffutronError(f"training supports ModernBERT masked LMs, got {self.mlm.config.model_type!r}")

    def forward(self, ids, attention_mask, masked, targets, weights, denominator):
        hidden = self.mlm.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        h = self.mlm.head(hidden[masked])
        w = self.mlm.decoder.weight
        b = self.mlm.decoder.bias
        w = w.to(h.dtype)  # bfloat16 under autocast; the gradient flows back to the float32 master
        b = None if b is None else b.to(h.dtype)
        if self._ops is None:  # chosen once, on the device the first batch runs on
            from ..backends import Ops

            self._ops = Ops.select(h.device, h.dtype, only=("cross_entropy",))
        loss = self._ops.cross_entropy(h, w, targets, bias=b, row_weight=weights, reduction="sum")
        return loss / denominator


def load_for_training(cfg: TrainConfig, device: torch.device):
    from transformers import AutoModelForMaskedLM

    from ..loading import (check_loading_info, check_tokenizer_fits, check_weights, load_tokenizer, prepare_tokenizer,
                           resolve_model_path)

    path = resolve_model_path(cfg.model)  # bundled names (tiny-tr), checked local folders, hub ids: as every command
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise DiffutronError(f"cannot load model {cfg.model!r}: {first_line(exc)}") from None
    check_loading_info(info, cfg.model)  # missing tensors would start training from random ones, silently
    check_weights(model, cfg.model)  # NaN/inf weights: one line naming the tensor
    tokenizer = prepare_tokenizer(load_tokenizer(path))
    check_tokenizer_fits(tokenizer, model.config.vocab_size, cfg.model)
    if cfg.lora:
        model = apply_lora(model, cfg)
    return model.to(device), tokenizer


def apply_lora(model, cfg: TrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DiffutronError("LoRA needs peft: pip install 'diffutron-engine[train]'") from None
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none")
    try:
        return get_peft_model(model, lcfg)
    except ValueError as exc:  # peft's "target modules not found" (a ValueError subclass)
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise DiffutronError(f"lora_targets {list(cfg.lora_targets)} do not name modules of this model "
                             f"({first_line(exc)[:120]}); its linear layers: {', '.join(linear)}") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; tied tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ----------------------------------------------------------------------------------------------- helpers
def _world() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _optimizer(cfg: TrainConfig, params, device):
    if cfg.optimizer == "paged_adamw_8bit" and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except ImportError:
            print("note: bitsandbytes is not installed; using torch AdamW", file=sys.stderr)
    elif cfg.optimizer == "paged_adamw_8bit":
        print("note: Paged AdamW 8-bit needs CUDA; using torch AdamW on CPU", file=sys.stderr)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def cosine_with_warmup(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _checkpoints(output_dir: str) -> list[str]:
    """Our completed checkpoints (their manifest written), oldest first; `_last_good` also verifies them."""
    return ck.ours(output_dir)


def _last_good(output_dir: str) -> str | None:
    """The newest checkpoint whose files match its manifest."""
    for c in reversed(_checkpoints(output_dir)):
        if ck.verify(c) is None:
            return c
    return None


# A checkpoint is saved only if, at its weights, the mean masked-token NLL of the step's first micro-batch
# is below this (and every weight and optimizer value is finite): a diverging run's weights give NLLs far
# above the ~ln(V) of an untrained model, and eval perplexity (exp of the NLL) overflows past ~709.
DIVERGED_NLL_FLOOR = 50.0


def _write_atomically(final: str, write) -> None:
    """write(tmp_dir) into a temporary directory beside `final` (a checkpoint-N or final/ of this run),
    then rename it into place; what was there is replaced only when this package wrote it."""
    why = ck.replaceable(final)
    if why:  # checked at the start too; a folder put there since must not be lost either
        raise DiffutronError(f"{final} is in the way of this run's save: {why}; move it away or choose another "
                             "--output-dir")
    # the name ck.clean removes as a killed save's leftover: one of this PID's is ours too
    tmp = os.path.join(os.path.dirname(final), f".tmp-{os.path.basename(final)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        if os.path.lexists(final):  # renamed away first: a kill in between leaves the new copy (see ck.clean)
            ck.remove(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------- resume checks
# A trainer_state.pt that verifies against its manifest is only as trustworthy as the manifest, which any
# tool can regenerate: what it unpickles to is checked against what a save writes before any of it is used,
# so a wrong value is one line naming it, never an exception from deep inside torch mid-run.


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.rank, self.world, local = _world()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.device = _device(local)
        torch.manual_seed(cfg.seed)
        self._check_outputs()
        # the data first (reading and parsing need no model): a bad file fails in a fraction of a second
        records = read_records(cfg.train_files, cfg.dataset, cfg.dataset_split)
        self.eval_texts = read_texts(cfg.eval_files, cfg.text_field) if cfg.eval_files else None
        self.model, self.tok = load_for_training(cfg, self.device)
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context and cfg.max_length > context:
            raise DiffutronError(f"max_length {cfg.max_length} exceeds the model's context of {context} tokens; "
                                 f"set max_length <= {context}")
        if self.tok.mask_token_id is None:
            raise DiffutronError("the tokenizer has no mask token")
        if cfg.task == "cpt":
            self.examples = cpt_examples(records, self.tok, cfg.max_length, cfg.pack, cfg.text_field)
        else:
            self.examples, skipped = sft_examples(records, self.tok, cfg.max_length)
            if skipped:
                self.log(f"note: {skipped} SFT rows skipped: their prompt alone exceeds max_length={cfg.max_length}")
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        if len(self.examples) < self.global_batch:
            raise DiffutronError(f"{len(self.examples)} examples are fewer than one global batch "
                                 f"({self.global_batch}); lower batch_size or grad_accum")
        self.steps_per_epoch = len(self.examples) // self.global_batch  # the ragged tail is dropped
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        if self.total_steps > MAX_STEPS:
            raise DiffutronError(f"{cfg.epochs:g} epochs of {self.steps_per_epoch:,} steps are {self.total_steps:,} "
                                 f"optimizer steps, more than {MAX_STEPS:,}; lower epochs or set max_steps")
        self.loss_module = MaskedLMLoss(self.model)
        self.ddp = self.loss_module
        self.fsdp = self.world > 1 and cfg.strategy == "fsdp"
        if self.fsdp:  # FSDP2: each encoder layer a shard group, the rest (embeddings = decoder) the root's
            from torch.distributed.fsdp import fully_shard

            for layer in self.loss_module.mlm.model.layers:
                fully_shard(layer)
            fully_shard(self.loss_module)
        elif self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[local] if self.device.type == "cuda" else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = _optimizer(cfg, self.params, self.device)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine_with_warmup(self.total_steps, max(warmup, 1)))
        self.step = 0
        self.autocast = (self.device.type == "cuda" and cfg.precision in ("auto", "bfloat16")) or \
            (cfg.precision == "bfloat16")
        self._prepare_output_dir()
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.diverged_nll = max(DIVERGED_NLL_FLOOR, 4 * math.log(self.model.get_input_embeddings().num_embeddings))

    def _check_outputs(self) -> None:
        """Before any work: output_dir is a folder (or new), and what the run writes there besides its
        checkpoints (final/, metrics.jsonl, loss.png) may be written: nothing in the way that the run
        did not write, no folder where a file goes, no input overwritten."""
        out = self.cfg.output_dir
        if os.path.lexists(out) and not os.path.isdir(out):
            raise DiffutronError(f"output_dir {out!r} is an existing file, so it is not a writable folder; choose "
                                 "another --output-dir")
        if not os.path.isdir(out):
            return  # a new folder: nothing in it to spare
        if not self.cfg.resume:
            self._refuse_an_earlier_run()
        final = os.path.join(out, "final")
        why = ck.replaceable(final)
        if why:
            raise DiffutronError(f"{final} is in the way of this run's final model: {why}; move it away or choose "
                                 "another --output-dir")
        if ck.older_final(final) and os.listdir(final):
            self.log(f"warning: {final} has no manifest.json (an older version wrote it) and holds only a final "
                     "model's files: this run replaces it with its own")
        for name, what in (("metrics.jsonl", "the metrics file"), ("loss.png", "the loss plot")):
            check_file_output(os.path.join(out, name), what, self._inputs())

    def _inputs(self) -> tuple[str, ...]:
        return (*self.cfg.train_files, *self.cfg.eval_files)

    def _refuse_an_earlier_run(self) -> None:
        """A new run (not --resume) into a folder that holds checkpoints of ours is refused: its saves
        would be mixed with the earlier run's, pruning (which keeps the highest steps) would delete the
        new ones, and `--resume latest` would pick the earlier run's newest."""
        earlier = ck.earlier_run(self.cfg.output_dir)
        if earlier:
            names = os.path.basename(earlier[-1]) + (f" and {len(earlier) - 1} more" if len(earlier) > 1 else "")
            raise DiffutronError(f"{self.cfg.output_dir} holds checkpoints of an earlier run ({names}); resume it "
                                 "with --resume latest, or choose another --output-dir (or move them away)")

    def _check_future_saves(self) -> None:
        """Before the first step: every checkpoint-N this run will save (after self.step) is free or one
        of ours, never another trainer's folder or a file of that name."""
        cfg = self.cfg
        if not cfg.resume:  # again: the start's cleanup may have finished an earlier run's interrupted save
            self._refuse_an_earlier_run()
        for n, path in ck.occupied(cfg.output_dir):
            if cfg.resume and n > self.step and os.path.isdir(path):
                continue  # a later checkpoint folder of the abandoned run: set aside whole before the first save
            saved = n % cfg.save_every == 0 or n == self.total_steps
            why = ck.replaceable(path) if self.step < n <= self.total_steps and saved else None
            if why:
                raise DiffutronError(f"{path} is in the way of this run's save at step {n}: {why}; move it away or "
                                     "choose another --output-dir")

    def _prepare_output_dir(self) -> None:
        """Created and writable before any step (or a clear error); leftovers of killed saves removed."""
        out = self.cfg.output_dir
        try:
            os.makedirs(out, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            raise DiffutronError(f"output_dir {out!r} is not a writable folder ({exc.strerror or exc}); "
                                 "choose another --output-dir") from None
        if self.rank == 0:
            ck.clean(out, self.log)

    # ------------------------------------------------------------------ batches
    def _step_indices(self, step: int) -> tuple[int, list[int]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.examples), self.cfg.seed, epoch)
        return epoch, order[pos * self.global_batch:(pos + 1) * self.global_batch]

    def _micro_batches(self, step: int):
        """This process's micro-batches of optimizer step `step`, and the step's global denominator."""
        cfg = self.cfg
        epoch, idx = self._step_indices(step)
        denominator = float(sum(int(self.examples[i].maskable.sum()) for i in idx))
        per = cfg.batch_size
        for m in range(cfg.grad_accum):
            lo = m * per * self.world + self.rank * per
            chunk = idx[lo: lo + per]
            ids, att, maskable = collate([self.examples[i] for i in chunk], self.tok.pad_token_id)
            inputs, masked, weights = mask_batch(ids, maskable, chunk, epoch, cfg.seed, cfg.objective,
                                                 self.tok.mask_token_id, cfg.mlm_probability, cfg.t_min)
            row_w = weights[:, None].expand_as(masked)[masked]
            yield (inputs, att, masked, ids[masked], row_w, int(att.sum())), denominator

    # ------------------------------------------------------------------ loop
    def train(self, stop_after: int | None = None) -> dict:
        """Run to the last step (or stop after `stop_after` steps, as an interrupted run would)."""
        cfg = self.cfg
        if cfg.resume:
            self._resume(cfg.resume)
        else:
            self._check_future_saves()
            if self.rank == 0 and os.path.lexists(self.metrics_path):  # an earlier run's, checked at the start
                os.remove(self.metrics_path)
        trainable, total = count_parameters(self.model)
        self.log(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), "
                 f"{len(self.examples):,} examples, global batch {self.global_batch}, {self.total_steps} steps, "
                 f"{self.world} process(es) on {self.device}")
        self.model.train()
        t_start, tokens_seen, last = time.perf_counter(), 0, {}
        while self.step < self.total_steps and (stop_after is None or self.step < stop_after):
            loss_sum, tokens = 0.0, 0
            for (inputs, att, masked, targets, row_w, ntok), denom in self._micro_batches(self.step):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss = self.ddp(inputs.to(self.device), att.to(self.device), masked.to(self.device),
                                    targets.to(self.device), row_w.to(self.device), denom)
                # DDP averages gradients over processes: scale so the step's gradient is the global sum
                (loss * self.world).backward()
                loss_sum += float(loss.detach())
                tokens += ntok
            stats = torch.tensor([loss_sum, tokens], dtype=torch.float64)
            if self.world > 1:
                dist.all_reduce(stats)
            loss_value, tokens = float(stats[0]), int(stats[1])
            if not math.isfinite(loss_value):
                self._diverged(f"the loss became {loss_value} at step {self.step + 1}")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            tokens_seen += tokens
            elapsed = time.perf_counter() - t_start
            last = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "loss": loss_value,
                    "lr": self.sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "elapsed_s": round(elapsed, 2)}
            if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                ck.append_jsonl(self.metrics_path, last)
            self._progress(last, elapsed)
            if cfg.eval_files and cfg.eval_every and self.step % cfg.eval_every == 0:
                self._evaluate()
            if self.step % cfg.save_every == 0 or self.step == self.total_steps:
                problem = self._health()
                if problem:
                    self._diverged(f"after step {self.step} {problem}")
                self.save_checkpoint()
        if self.rank == 0 and sys.stderr.isatty():
            print(file=sys.stderr)
        result = {"steps": self.step, "final_loss": last.get("loss"), "output_dir": cfg.output_dir}
        if self.step == self.total_steps:
            result["final_model"] = self.save_final()
            if cfg.eval_files:
                result["eval"] = self._evaluate()
            if self.rank == 0:
                result["loss_curve"] = plot_loss_curve(self.metrics_path, os.path.join(cfg.output_dir, "loss.png"),
                                                       self._inputs())
        if self.world > 1:
            dist.barrier()
        return result

    def _diverged(self, what: str) -> None:
        good = _last_good(self.cfg.output_dir)
        hint = (f"resume it with a lower learning rate: --resume {good} --set lr=..." if good else
                "no checkpoint was saved yet: start again with a lower learning rate")
        raise TrainingDiverged(f"{what}; stopped without saving. Last good checkpoint: {good or 'none'} ({hint}), "
                               "or check the data.")

    @torch.no_grad()
    def _health(self) -> str | None:
        """None if the current weights may be saved as a good checkpoint, else what is wrong: a non-finite
        weight or optimizer value, or a diverged loss at these weights (the step's first micro-batch,
        plain mean NLL). Every rank takes part (FSDP's forward is collective)."""
        problem = None
        for name, p in self.model.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(getattr(p, "_local_tensor", p)).all()):
                problem = f"the weight {name} holds NaN or inf"
                break
        if problem is None:
            for state in self.opt.state.values():
                bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                       and not bool(torch.isfinite(getattr(v, "_local_tensor", v)).all())]
                if bad:
                    problem = f"the optimizer state ({bad[0]}) holds NaN or inf"
                    break
        # every rank runs the probe, whatever it found above: FSDP's forward is collective
        (inputs, att, masked, targets, row_w, _), _ = next(self._micro_batches(self.step - 1))
        n = int(masked.sum())
        was = self.model.training
        self.model.eval()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            nll = float(self.ddp(inputs.to(self.device), att.to(self.device), masked.to(self.device),
                                 targets.to(self.device), torch.ones(n, device=self.device), max(n, 1)))
        self.model.train(was)
        if problem is None and (not math.isfinite(nll) or nll > self.diverged_nll):
            problem = (f"the loss at the new weights is {nll:.4g} per masked token (diverged: above "
                       f"{self.diverged_nll:.0f})")
        flag = torch.tensor([0.0 if problem is None else 1.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag)
        if problem is None and float(flag) > 0:
            problem = "another process found NaN, inf or a diverged loss"
        return problem

    def _progress(self, m: dict, elapsed: float) -> None:
        if self.rank != 0:
            return
        eta = elapsed / self.step * (self.total_steps - self.step)
        line = (f"step {self.step}/{self.total_steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
                f"{m['tokens_per_s']:,.0f} tok/s  ETA {eta / 60:.1f} min")
        if sys.stderr.isatty():
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
            print(line, file=sys.stderr, flush=True)

    def _evaluate(self) -> dict | None:
        if self.fsdp:  # a sharded forward needs every rank; evaluate the saved checkpoint instead
            self.log("note: no in-training evaluation under FSDP; run `diffutron-engine eval perplexity` on final/")
            return None
        if self.rank != 0:
            return None
        from .evaluate import masked_lm_perplexity

        self.model.eval()
        res = masked_lm_perplexity(self.model, self.tok, self.eval_texts, max_length=self.cfg.max_length, seed=self.cfg.seed)
        self.model.train()
        ck.append_jsonl(self.metrics_path, {"step": self.step, "eval": res})
        self.log(f"eval at step {self.step}: perplexity {res['perplexity']:.3f}, accuracy {res['accuracy']:.4f}")
        return res

    # ------------------------------------------------------------------ checkpoints
    def _full_state_dict(self):
        """None (the model's own tensors) or, under FSDP, the gathered full state dict (a collective:
        every rank calls it)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if getattr(self.loss_module.mlm.config, "tie_word_embeddings", False):
            # the decoder weight is the embedding: saved once, as save_pretrained does on its own
            full = {k: v for k, v in full.items() if not k.endswith("decoder.weight")}
        return full

    def save_checkpoint(self) -> str | None:
        path = os.path.join(self.cfg.output_dir, f"checkpoint-{self.step}")
        full = self._full_state_dict()
        if self.rank == 0:
            # FSDP: the optimizer state is sharded, so its checkpoints hold weights only (no resume yet)
            state = {"step": self.step, "optimizer": None if self.fsdp else self.opt.state_dict(),
                     "scheduler": self.sched.state_dict(), "rng": torch.get_rng_state(), "config": self.cfg.to_dict()}

            def write(tmp):
                self.model.save_pretrained(tmp, state_dict=full)
                self.tok.save_pretrained(tmp)
                torch.save(state, os.path.join(tmp, ck.STATE))
                with open(os.path.join(tmp, ck.CONFIG), "w") as f:  # read by `train --resume` (no torch.load)
                    json.dump(self.cfg.to_dict(), f, indent=1)
                ck.write_manifest(tmp, self.step)  # last: a folder with a manifest is complete

            _write_atomically(path, write)
            ck.prune(self.cfg.output_dir, self.cfg.keep_last)
        if self.world > 1:
            dist.barrier()
        return path

    # ------------------------------------------------------------------ resume
    # Settings that decide each step's examples, masks and model: a resumed run must keep them (else its
    # steps would not continue the checkpoint's run). The others may change; the new value is printed.
    _FIXED_ON_RESUME = ("task", "objective", "mlm_probability", "t_min", "max_length", "pack", "seed", "batch_size",
                        "grad_accum", "train_files", "dataset", "dataset_split", "text_field", "lora", "lora_r",
                        "lora_alpha", "lora_targets", "lora_dropout", "optimizer")

    def _resume(self, where: str) -> None:
        path, state = self._restore(where)
        self.step = state["step"]
        self._apply_changed_settings(state.get("config") or {})
        self._check_future_saves()
        if self.rank == 0 and os.path.exists(self.metrics_path):  # drop what the lost steps logged
            records, dropped = ck.read_jsonl(self.metrics_path)
            ck.rewrite_jsonl(self.metrics_path, [r for r in records if r.get("step", 0) <= self.step])
            if dropped:
                self.log(f"metrics.jsonl: dropped {dropped} incomplete line(s) (a kill mid-write)")
        if self.rank == 0:
            self._set_aside_later_checkpoints()
        self.log(f"resumed from {path} at step {self.step}")

    def _restore(self, where: str) -> tuple[str, dict]:
        """Load the checkpoint to resume into the model, optimizer, scheduler and random generator, and
        return (its folder, its state). `latest` is the newest checkpoint that verifies and loads (older
        ones are tried when the newest fails, with a warning); an explicit folder must verify and load. A
        checkpoint of an older version (a trainer state, no manifest) is taken with a warning that it
        could not be verified."""
        if where != "latest":
            if not os.path.isdir(where):
                raise DiffutronError(f"--resume {where}: no such checkpoint folder")
            return where, self._restore_from(where)
        folders = ck.checkpoint_folders(self.cfg.output_dir)
        if not folders:
            raise DiffutronError(f"--resume latest: no checkpoint in {self.cfg.output_dir}")
        for folder in reversed(folders):
            try:
                return folder, self._restore_from(folder)
            except BadCheckpoint as exc:
                why = exc.why
                self.log(f"warning: {folder} {exc.kind} ({why}); trying the one before it")
        raise DiffutronError(f"--resume latest: no checkpoint in {self.cfg.output_dir} passes verification and "
                             f"loads (the oldest: {why}); start a new run or restore a checkpoint")

    def _restore_from(self, path: str) -> dict:
        """One checkpoint loaded, or BadCheckpoint (what it holds is wrong) or DiffutronError (it does
        not suit this run's settings: no other checkpoint of the run would)."""
        state = self._read_state(path)
        self._check_resume_settings(path, state)
        try:
            self._load_weights(path)
        except Exception as exc:  # unreadable weights, or shapes that do not match (another model)
            raise BadCheckpoint(path, f"its weights do not fit this model: {first_line(exc)}") from None
        why = optimizer_problem(self.opt, state["optimizer"]) or scheduler_problem(self.sched, state)
        if why:
            raise BadCheckpoint(path, why)
        try:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(dict(state["scheduler"]))
            torch.set_rng_state(state["rng"])
        except Exception as exc:  # what the checks above cannot foresee: the optimizer's own refusals
            raise BadCheckpoint(path, f"its optimizer, scheduler or random state does not load: "
                                      f"{first_line(exc)}") from None
        return state

    def _read_state(self, path: str) -> dict:
        """The verified, unpickled and checked trainer state of a checkpoint, or BadCheckpoint."""
        why = ck.verify(path)
        if why and why.startswith("no manifest") and os.path.isfile(os.path.join(path, ck.STATE)):
            self.log(f"warning: {path} has no manifest (an older version wrote it): resumed unverified")
        elif why:
            raise BadCheckpoint(path, why, "fails verification")
        file = os.path.join(path, ck.STATE)
        try:  # tensors and plain containers only: a crafted checkpoint cannot run code
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # a file that verifies but does not unpickle as weights: say which
            raise BadCheckpoint(path, f"cannot read {file}: {first_line(exc)}") from None
        why = state_problem(state, expected_step(path))
        if why:
            raise BadCheckpoint(path, f"its {ck.STATE} {why}")
        return state

    def _check_resume_settings(self, path: str, state: dict) -> None:
        """The user's settings against the checkpoint's: a mismatch is one line saying what to do (an
        older checkpoint of the same run would not suit them either)."""
        saved = state.get("config") or {}
        current = self.cfg.to_dict()
        if "lora" in saved and bool(saved["lora"]) != self.cfg.lora:
            kind = "LoRA adapters" if saved["lora"] else "all weights (full training)"
            flag = "--lora" if saved["lora"] else "--no-lora"
            raise DiffutronError(f"checkpoint {path} trained {kind}; resume it with {flag}, or start a new run in "
                                 "another --output-dir")
        fixed = {k: (saved[k], current[k]) for k in self._FIXED_ON_RESUME if k in saved and saved[k] != current[k]}
        if fixed:
            raise DiffutronError(
                "these settings decide what each step trains on and cannot change on resume: " +
                ", ".join(f"{k} {_show(new, 200)} (checkpoint: {_show(old, 200)})" for k, (old, new) in fixed.items()) +
                "; resume with the checkpoint's values (`train --resume` alone keeps them), or start a new run from "
                "its weights in another --output-dir")
        step = state["step"]
        if step > self.total_steps:  # (equal: a run killed before final/ was written; it finishes)
            raise DiffutronError(f"checkpoint {path} is at step {step}, past this run's last step "
                                 f"{self.total_steps} (--max-steps / epochs): nothing to train; raise --max-steps "
                                 f"above {step}")
        if state["optimizer"] is None:
            raise DiffutronError(f"checkpoint {path} holds no optimizer state (an FSDP run's): it can be loaded as "
                                 "--model for a new run, not resumed")

    def _apply_changed_settings(self, saved: dict) -> None:
        current = self.cfg.to_dict()
        changed = {k: (saved[k], current[k]) for k in saved if k in current and k not in self._FIXED_ON_RESUME
                   and k not in ("resume", "output_dir") and saved[k] != current[k]}
        if not changed:
            return
        # the optimizer and scheduler states carry the checkpoint's lr and weight decay: the flags win
        factor = cosine_with_warmup(self.total_steps, max(int(self.cfg.warmup_ratio * self.total_steps), 1))
        self.sched.base_lrs = [self.cfg.lr for _ in self.sched.base_lrs]
        for group in self.opt.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * factor(self.step)
            group["weight_decay"] = self.cfg.weight_decay
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        self.log("resume: these settings differ from the checkpoint's; the new values are used: " +
                 ", ".join(f"{k} {_show(new, 200)} (checkpoint: {_show(old, 200)})"
                           for k, (old, new) in changed.items()))

    def _set_aside_later_checkpoints(self) -> None:
        """Checkpoint folders after the resumed step belong to the run being abandoned: renamed aside whole,
        never mixed in nor deleted. Those that do not verify as ours (a corrupted save, often the very
        reason `--resume latest` fell back) are set aside too: a rename keeps every byte of them."""
        for later in ck.checkpoint_folders(self.cfg.output_dir):
            if ck.step_of(later) > self.step:
                why = ck.replaceable(later)
                aside = os.path.join(self.cfg.output_dir, f".set-aside-{os.path.basename(later)}-{int(time.time())}")
                os.replace(later, aside)
                self.log(f"set aside {later} (after the resumed step {self.step}"
                         f"{'; ' + why if why else ''}) as {aside}")

    def _load_weights(self, path: str) -> None:
        from safetensors.torch import load_file

        if self.cfg.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(os.path.join(path, "adapter_model.safetensors")))
        else:
            sd = load_file(os.path.join(path, "model.safetensors"))
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
            # the decoder weight is tied to the embeddings and saved once
            if unexpected or [m for m in missing if not m.startswith("decoder.")]:
                raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")

    def save_final(self) -> str | None:
        """The trained model as the engine loads it: a plain checkpoint (full training) or the LoRA
        adapter (merge it with `diffutron-engine train merge`)."""
        path = os.path.join(self.cfg.output_dir, "final")
        full = self._full_state_dict()
        if self.rank == 0:
            def write(tmp):
                self.model.save_pretrained(tmp, state_dict=full)
                self.tok.save_pretrained(tmp)
                ck.write_manifest(tmp, self.step)  # marks it ours: a later run may replace it, nothing else

            _write_atomically(path, write)
        return path


def plot_loss_curve(metrics_path: str, png: str, inputs: tuple = ()) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps, losses = [], []
    for row in ck.read_jsonl(metrics_path)[0]:
        if "loss" in row:
            steps.append(row["step"])
            losses.append(row["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_file(check_file_output(png, "the loss plot", inputs), image.getvalue(), "the loss plot")
    return png


# ----------------------------------------------------------------------------------------------- merge
