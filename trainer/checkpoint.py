"""Checkpoints: atomic folders holding everything needed to continue a run exactly.

    checkpoint-<step>/
        controlnet/{config.json, diffusion_pytorch_model.safetensors}   (diffusers layout, fp32)
        unet_decoder.safetensors        (only with --unlock-decoder)
        training_state.safetensors      (optimizer tensors, RNG states)
        state.json                      (step, data position, scaler, optimizer skeleton, config,
                                         and the size of every file above; written last)

A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a
folder that looks finished. `state.json` lists every file's size, and a folder whose files do not
match it is never chosen by `--resume latest`. Everything loads with safetensors and json: nothing is
unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.atomic import publish_dir

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
# What engine.atomic leaves of a run's own outputs when the process is killed (SIGKILL, the OOM killer) between
# writing and renaming: NAME.<8 hex>.tmp beside NAME (engine.atomic.tmp_path). The export's are as large as the
# ControlNet (and the UNet); a rerun writes under a new name, so nothing else ever removes them.
STALE_WRITE_RE = re.compile(r"^(checkpoint-\d+|controlnet|controlnet-fp16\.safetensors|unet|train_log\.jsonl|train_config\.json"
                            r"|loss\.png|progress\.png|step-\d+_[\w-]+\.png)\.[0-9a-f]{8}\.tmp$")
STALE_WRITE_DIRS = ("", "validation")  # the output folder and its validation images (trainer.plots.save_png)
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """The loop's counters: optimizer steps done and the data position after the last batch used."""

    step: int = 0
    batches: int = 0
    epoch: int = 0
    offset: int = 0
    failed_samples: int = 0
    samples: int | None = None
    """Global samples consumed, all processes together (None from checkpoints that predate it)."""
    extra: dict[str, Any] = field(default_factory=dict)


# --- nested state dicts <-> (json skeleton, flat tensors) -------------------------------------------

def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace every tensor in a nested structure by a reference into `tensors`; keep key types."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().clone() if obj.numel() else obj.detach().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), flatten(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def _key(k: Any) -> Any:
    """Dict keys keep their type (optimizer state is keyed by int)."""
    return {"int": k} if isinstance(k, int) else k


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of flatten."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {(k["int"] if isinstance(k, dict) else k): unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [unflatten(v, tensors) for v in obj["__list__"]]
    return obj


# --- finding checkpoints --------------------------------------------------------------------------

def is_complete(path: Path) -> bool:
    """True when state.json exists and every file it lists has the recorded size."""
    try:
        manifest = json.loads((path / STATE_FILE).read_text())["files"]
        return all((path / name).stat().st_size == size for name, size in manifest.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output`, oldest first."""
    found = []
    for p in Path(output).glob("checkpoint-*"):
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


class CheckpointNotFoundError(FileNotFoundError):
    """--resume names a folder that is not a complete checkpoint (the CLI prints it as one line, exit 2)."""


def resolve_resume(resume: str | None, output: Path) -> Path | None:
    """The checkpoint folder `--resume` names: `latest` is the newest complete one (or none)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.exists() and (Path(output) / resume).exists():  # diffusers' form: a name inside --output
        path = Path(output) / resume
    if not is_complete(path):
        raise CheckpointNotFoundError(f"--resume {resume}: not a complete checkpoint folder (state.json missing or "
                                "files truncated); use --resume latest to pick the newest complete one")
    return path


def set_aside_newer(output: Path, step: int) -> list[Path]:
    """Rename the complete checkpoints in `output` past `step` to `checkpoint-N.superseded` (then `-2`, ...): a
    resume from an older checkpoint abandons them, so neither `--resume latest` nor the retention may take them
    for this run's (the run they came from was cut where the resumed one took over). Renamed, not deleted: the
    user chose the older step, perhaps by mistake. Returns the new names."""
    moved = []
    for n, path in list_checkpoints(output):
        if n <= step:
            continue
        target, k = path.with_name(f"{path.name}.superseded"), 1
        while target.exists():
            k += 1
            target = path.with_name(f"{path.name}.superseded-{k}")
        os.replace(path, target)
        moved.append(target)
    return moved


def prune(output: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, any stale temporary folders, and the temporary
    files and folders of the run's atomic writes (the export, the log, the plots and validation images) left by a
    killed process."""
    removed = [p for p in Path(output).glob(TMP_PREFIX + "*")]
    removed += [p for d in STALE_WRITE_DIRS for p in (Path(output) / d).glob("*.tmp") if STALE_WRITE_RE.match(p.name)]
    found = list_checkpoints(output)
    if keep is not None and len(found) > keep:
        removed += [p for _, p in found[: len(found) - keep]]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            _delete_dir(p)
        else:
            p.unlink(missing_ok=True)
    return removed


def _delete_dir(path: Path) -> None:
    """Delete a folder; a checkpoint is first renamed to a temporary name, so that a kill part-way through (a
    SIGKILL, a second Ctrl-C between two unlinks) leaves a temporary folder, removed by the next prune, and not a
    checkpoint-N that is no longer complete, which nothing would ever choose or remove."""
    if CKPT_RE.match(path.name):
        doomed = path.with_name(f"{TMP_PREFIX}{path.name.removeprefix('checkpoint-')}.deleted")
        shutil.rmtree(doomed, ignore_errors=True)
        try:
            os.replace(path, doomed)
            path = doomed
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


# --- checking that a resume continues the same run ------------------------------------------------

# Settings a resumed run must share with its checkpoint: the model's shape, the data stream's order
# and position, and the optimizer/scaler state's meaning. Step counts, learning rates, schedules,
# logging, validation, workers and memory savers may change.
RESUME_MUST_MATCH = ("model.model", "model.revision", "model.variant", "model.unlock_decoder",
                     "model.only_mid_control", "data.shards", "data.resolution", "data.train_batch_size",
                     "data.shuffle_buffer", "optim.optimizer", "optim.gradient_accumulation_steps",
                     "mixed_precision", "seed")


class ResumeMismatchError(ValueError):
    """--resume names a checkpoint of another model shape or run settings; the message names the flags."""


def _get(d: Any, path: str) -> Any:
    """A dotted path in a nested dict, or KeyError."""
    for part in path.split("."):
        d = d[part]
    return d


def flag_of(path: str) -> str:
    """The command-line flag of a config path (`data.resolution` -> `--resolution`)."""
    from trainer.cli import build_parser  # the parser's dests are the config paths

    flags = {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    return flags.get(path, path)


def settings_mismatch(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(flag, checkpoint value, current value) for each setting of RESUME_MUST_MATCH that differs."""
    diffs = []
    for path in RESUME_MUST_MATCH:
        try:
            old, new = _get(saved, path), _get(current, path)
        except (KeyError, TypeError):  # a checkpoint from before the setting existed
            continue
        if old != new:
            diffs.append((flag_of(path), old, new))
    return diffs


def shape_mismatch(path: Path, controlnet_config: dict) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint value, current value) for each ControlNet config field that differs."""
    saved = json.loads((path / "controlnet" / "config.json").read_text())
    current = json.loads(json.dumps(dict(controlnet_config), default=str))  # tuples -> lists, as saved
    return [(k, v, current.get(k)) for k, v in saved.items() if not k.startswith("_") and current.get(k) != v]


def check_resume(path: Path, config: dict, controlnet_config: dict) -> None:
    """Raise ResumeMismatchError naming each differing flag when a checkpoint is not this run's."""
    path = Path(path)
    saved = json.loads((path / STATE_FILE).read_text()).get("config") or {}
    shape = shape_mismatch(path, controlnet_config)
    if shape:
        fields = ", ".join(f"{k} {old} (now {new})" for k, old, new in shape[:4])
        model = saved.get("model", {}).get("model", "?")
        raise ResumeMismatchError(
            f"{path} holds a ControlNet of another shape: {fields}. It was trained from --model {model}; "
            f"rerun with --model {model} (and its --controlnet), or start a new --output")
    diffs = settings_mismatch(saved, config)
    if diffs:
        was = ", ".join(f"{flag} {old} (now {new})" for flag, old, new in diffs)
        again = " ".join(f"{flag} {old}" for flag, old, _ in diffs)
        raise ResumeMismatchError(f"checkpoint {path} was trained with {was}; rerun with {again} "
                                  "or start a new --output")


# --- saving and loading ---------------------------------------------------------------------------

def rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The loop's generator state plus the global CPU and CUDA generator states."""
    out = {"rng/loop": generator.get_state(), "rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/cuda{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Inverse of rng_tensors (CUDA states only where the device count matches)."""
    generator.set_state(tensors["rng/loop"].cpu())
    torch.set_rng_state(tensors["rng/cpu"].cpu())
    cuda = [tensors[k].cpu() for k in sorted(tensors) if k.startswith("rng/cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(output: Path, state: TrainState, controlnet, optimizer, scaler, generator,
                    config: dict, decoder: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint-<step> atomically (temporary folder, then rename) and return its path."""
    output = Path(output)
    final = output / f"checkpoint-{state.step}"
    tmp = output / f"{TMP_PREFIX}{state.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
    if decoder is not None:
        save_file({k: v.contiguous() for k, v in decoder.items()}, str(tmp / "unet_decoder.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(optimizer.state_dict(), tensors, "optim")
    tensors = {k: v.cpu() for k, v in tensors.items()} | rng_tensors(generator)
    save_file(tensors, str(tmp / "training_state.safetensors"))
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    doc = {"step": state.step, "batches": state.batches, "epoch": state.epoch, "offset": state.offset, "samples": state.samples,
           "failed_samples": state.failed_samples, "extra": state.extra, "scaler": scaler.state_dict(),
           "optimizer": skeleton, "config": config, "files": files}
    (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1))
    publish_dir(tmp, final)  # flushed whole, then renamed; a re-run reaching the same step replaces it
    return final


def load_checkpoint(path: Path, controlnet, optimizer, scaler, generator, unet=None,
                    config: dict | None = None) -> TrainState:
    """Restore weights, optimizer, scaler and RNG from a checkpoint folder; return the loop state.

    With `config` (the current run's TrainConfig.to_dict()), first check that the checkpoint is of
    the same model shape and run settings (ResumeMismatchError names the flags otherwise).
    """
    path = Path(path)
    if config is not None:
        check_resume(path, config, controlnet.config)
    doc = json.loads((path / STATE_FILE).read_text())
    weights = load_file(str(path / "controlnet" / "diffusion_pytorch_model.safetensors"))
    controlnet.load_state_dict(weights, strict=True)
    if (path / "unet_decoder.safetensors").exists():
        if unet is None:
            raise ValueError(f"{path} holds an unlocked UNet decoder: resume with --unlock-decoder")
        unet.load_state_dict(load_file(str(path / "unet_decoder.safetensors")), strict=False)
    tensors = load_file(str(path / "training_state.safetensors"))
    optim_sd = unflatten(doc["optimizer"], tensors)
    if type(optimizer).__module__.startswith("bitsandbytes"):
        optim_sd = _to_param_devices(optim_sd, optimizer)  # PyTorch's own optimizers place state themselves
    optimizer.load_state_dict(optim_sd)
    scaler.load_state_dict(doc["scaler"])
    restore_rng(tensors, generator)
    return TrainState(step=doc["step"], batches=doc["batches"], epoch=doc["epoch"], offset=doc["offset"],
                      failed_samples=doc.get("failed_samples", 0), samples=doc.get("samples"), extra=doc.get("extra", {}))


def _to_param_devices(sd: dict, optimizer) -> dict:
    """Move optimizer state tensors onto their parameters' devices (bitsandbytes leaves most on the CPU)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, st in sd["state"].items():
        dev = params[pid].device
        sd["state"][pid] = _move(st, dev)
    return sd


def _move(obj: Any, device: torch.device) -> Any:
    """Recursively move tensors to a device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj
