"""What a resume trusts: a trainer state unpickled from a checkpoint is checked against the shape a save
writes and against this run's optimizer and scheduler before anything is loaded into them. Each check
returns None or what is wrong, worded to follow "its trainer_state.pt" in a message naming the checkpoint."""

from __future__ import annotations

import math

import torch

from ..bounded import show
from . import checkpoints as ck

_STATE_KEYS = ("step", "optimizer", "scheduler", "rng")
_ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")  # what torch's AdamW keeps per parameter after a step


def _show(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else show(value)


def expected_step(folder: str) -> int | None:
    """The step a checkpoint is at by its manifest, else by its name (checkpoint-N), else None."""
    step = ck.manifest_step(folder)
    return ck.name_step(folder) if step is None else step


def state_problem(state, expected_step: int | None) -> str | None:
    """None if `state` has the shape of a saved trainer state, else what is wrong (after "its
    trainer_state.pt")."""
    if not isinstance(state, dict):
        return f"holds {_show(state) if torch.is_tensor(state) else 'a ' + type(state).__name__}, not a trainer state"
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        return f"lacks {', '.join(missing)}"
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"has step {_show(step)}, not a non-negative integer"
    if expected_step is not None and step != expected_step:
        return f"says step {step}, but the checkpoint is at step {expected_step}"
    if state["optimizer"] is not None and not isinstance(state["optimizer"], dict):
        return f"has an optimizer state that is {_show(state['optimizer'])}, not a mapping"
    if not isinstance(state["scheduler"], dict):
        return f"has a scheduler state that is {_show(state['scheduler'])}, not a mapping"
    rng, want = state["rng"], torch.get_rng_state()
    if not torch.is_tensor(rng) or rng.dtype != want.dtype or rng.shape != want.shape:
        return f"has a random state that is {_show(rng)}, not the generator's {want.numel()} bytes"
    config = state.get("config")
    if config is not None and not (isinstance(config, dict) and all(isinstance(k, str) for k in config)
                                   and all(_plain(v) for v in config.values())):
        return "has a config that is not a mapping of settings"
    return None


def _plain(value, depth: int = 0) -> bool:
    """A setting's value as train_config.json holds it: a string, number, bool, None or list of them."""
    if isinstance(value, list):
        return depth == 0 and all(_plain(v, 1) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _same_kind(saved, fresh) -> bool:
    """`saved` has the type and shape of `fresh` (a value the optimizer or scheduler holds now): numbers
    finite, lists and tuples of the same length, mappings with the same keys, tensors of the same shape."""
    if isinstance(fresh, bool) or fresh is None or isinstance(fresh, str):
        return type(saved) is type(fresh)
    if isinstance(fresh, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and \
            (isinstance(saved, int) or math.isfinite(saved))
    if isinstance(fresh, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(fresh) and all(map(_same_kind, saved, fresh))
    if isinstance(fresh, dict):
        return isinstance(saved, dict) and set(saved) == set(fresh) and \
            all(_same_kind(saved[k], fresh[k]) for k in fresh)
    if torch.is_tensor(fresh):
        return torch.is_tensor(saved) and saved.shape == fresh.shape and saved.dtype == fresh.dtype
    return type(saved) is type(fresh)


def optimizer_problem(opt, saved) -> str | None:
    """None if `saved` fits `opt` (its groups, its parameters' shapes, finite values), else what is wrong."""
    fresh = opt.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        return "its optimizer state is not a mapping of state and param_groups"
    groups = saved["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(fresh["param_groups"]):
        return "its optimizer state has another number of parameter groups than this run's"
    for group, now in zip(groups, fresh["param_groups"]):
        if not isinstance(group, dict) or group.get("params") != now["params"]:
            return "its optimizer's parameter groups do not list this run's parameters"
        bad = [k for k in set(group) & set(now) - {"params"} if not _same_kind(group[k], now[k])]
        if bad:
            return f"its optimizer setting {sorted(bad)[0]} is {_show(group[sorted(bad)[0]])}"
    params = [p for g in opt.param_groups for p in g["params"]]
    state = saved["state"]
    if not isinstance(state, dict):
        return "its per-parameter optimizer state is not a mapping"
    for i, entry in state.items():
        why = _parameterstate_problem(opt, params, i, entry)
        if why:
            return why
    return None


def _parameterstate_problem(opt, params, i, entry) -> str | None:
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params) or not isinstance(entry, dict):
        return f"its optimizer state names a parameter {_show(i)} this run does not have"
    if isinstance(opt, torch.optim.AdamW) and entry and not all(k in entry for k in _ADAMW_STATE):
        return f"its optimizer state of parameter {i} lacks {', '.join(k for k in _ADAMW_STATE if k not in entry)}"
    for key, value in entry.items():
        moment = key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        # a step count may be a plain number (bitsandbytes keeps one); everything else a tensor
        if not torch.is_tensor(value) and (moment or not _same_kind(value, 0.0)):
            return f"its optimizer state {key} of parameter {i} is {_show(value)}, not a tensor"
        if not torch.is_tensor(value):
            continue
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"its optimizer state {key} of parameter {i} holds NaN or inf"
        if moment and value.shape != params[i].shape:
            return (f"its optimizer state {key} of parameter {i} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(params[i].shape)}")
        if moment and key != "exp_avg" and bool((value < 0).any()):
            return f"its optimizer state {key} of parameter {i} holds negative values"
    return None


def scheduler_problem(sched, state: dict) -> str | None:
    """None if the saved scheduler state fits `sched` and is at the state's step, else what is wrong.
    Its keys become the scheduler's attributes on load: only those it has are accepted."""
    saved, fresh = state["scheduler"], sched.state_dict()
    unknown = sorted(str(k) for k in saved if k not in fresh)
    if unknown:
        return f"its scheduler state holds {_show(unknown[0])}, which this scheduler does not have"
    for key in ("base_lrs", "last_epoch", "lr_lambdas"):
        if key not in saved:
            return f"its scheduler state lacks {key}"
    bad = [k for k in saved if not _same_kind(saved[k], fresh[k])]
    if bad:
        return f"its scheduler's {bad[0]} is {_show(saved[bad[0]])}"
    if saved["last_epoch"] != state["step"]:
        return f"its scheduler is at step {saved['last_epoch']}, the state says step {state['step']}"
    return None
