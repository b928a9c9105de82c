"""diffusers' spellings of the trainer's flags, and help text with defaults for every flag.

`add_diffusers_spellings(parser)` makes every flag of diffusers' examples/controlnet/train_controlnet.py
that has a meaning here parse under its own spelling (underscores included) to the same config field;
the rest exit with status 2 and a message naming what to use instead. `document(parser)` gives each
flag without help text its field's docstring from trainer/config.py, and a metavar without the
`section.` prefix, so `--help` shows a sentence and the default of every flag.
"""

from __future__ import annotations

import argparse
import ast
import functools
from pathlib import Path

# diffusers' spelling -> ours, where both mean the same thing (the action is shared: same type, choices,
# default). Flags whose spelling only differs in '_' vs '-' are listed too: argparse does not equate them.
SAME_MEANING = {
    "--pretrained_model_name_or_path": "--model",
    "--controlnet_model_name_or_path": "--controlnet",
    "--revision": "--revision",
    "--variant": "--variant",
    "--output_dir": "--output",
    "--seed": "--seed",
    "--resolution": "--resolution",
    "--train_batch_size": "--train-batch-size",
    "--max_train_steps": "--max-train-steps",
    "--checkpointing_steps": "--checkpointing-steps",
    "--checkpoints_total_limit": "--checkpoints-total-limit",
    "--resume_from_checkpoint": "--resume",
    "--gradient_accumulation_steps": "--gradient-accumulation-steps",
    "--gradient_checkpointing": "--gradient-checkpointing",
    "--learning_rate": "--learning-rate",
    "--lr_scheduler": "--lr-scheduler",
    "--lr_warmup_steps": "--lr-warmup-steps",
    "--dataloader_num_workers": "--dataloader-num-workers",
    "--adam_beta1": "--adam-beta1",
    "--adam_beta2": "--adam-beta2",
    "--adam_weight_decay": "--adam-weight-decay",
    "--adam_epsilon": "--adam-epsilon",
    "--max_grad_norm": "--max-grad-norm",
    "--mixed_precision": "--mixed-precision",
    "--proportion_empty_prompts": "--proportion-empty-prompts",
    "--num_validation_images": "--num-validation-images",
    "--validation_steps": "--validation-steps",
}

# diffusers' flags that take several values after one flag (nargs="+"); ours repeat the flag instead.
SEVERAL_VALUES = {"--validation_prompt": "--validation-prompt", "--validation_image": "--validation-image"}

# diffusers' flags with no counterpart here, and what to do instead.
NOT_HERE = {
    "--tokenizer_name": "the tokenizer always comes from --model's tokenizer/ folder",
    "--cache_dir": "set HF_HUB_CACHE (or HF_HOME) to move the Hugging Face cache",
    "--num_train_epochs": "use --max-train-steps (the shard stream repeats; an epoch is not a unit here)",
    "--scale_lr": "multiply --learning-rate by train batch size x accumulation steps yourself",
    "--lr_num_cycles": "cosine_with_restarts is not offered; use --lr-scheduler cosine",
    "--lr_power": "the polynomial schedule is not offered; use --lr-scheduler linear or cosine",
    "--push_to_hub": "not done by the trainer; upload OUTPUT/controlnet with `hf upload`",
    "--hub_token": "not done by the trainer; upload OUTPUT/controlnet with `hf upload`",
    "--hub_model_id": "not done by the trainer; upload OUTPUT/controlnet with `hf upload`",
    "--logging_dir": "logs always go to OUTPUT/train_log.jsonl and OUTPUT/tensorboard/",
    "--report_to": "TensorBoard logs are always written to OUTPUT/tensorboard/ (plus OUTPUT/train_log.jsonl)",
    "--tracker_project_name": "TensorBoard logs are always written to OUTPUT/tensorboard/",
    "--allow_tf32": "not offered; training runs under --mixed-precision fp16/bf16 autocast",
    "--enable_xformers_memory_efficient_attention": "SDPA (PyTorch's flash/memory-efficient attention) is "
                                                    "always used; xformers is not needed",
    "--set_grads_to_none": "gradients are always set to None between steps",
    "--dataset_name": "the trainer reads WebDataset shards: use --shards (make them with `python -m engine shards`)",
    "--dataset_config_name": "the trainer reads WebDataset shards: use --shards",
    "--train_data_dir": "make shards from your folder with `python -m engine shards DIR --output shards`, "
                        "then pass --shards 'shards/{00000..NNNNN}.tar'",
    "--image_column": "shards have fixed members (jpg, cond png, txt): no columns to pick",
    "--conditioning_image_column": "shards have fixed members (jpg, cond png, txt): no columns to pick",
    "--caption_column": "shards have fixed members (jpg, cond png, txt): no columns to pick",
    "--max_train_samples": "pass fewer shards to --shards",
}


def add_diffusers_spellings(parser: argparse.ArgumentParser) -> None:
    """Accept diffusers' spellings that mean something here; reject the rest with our equivalent."""
    for theirs, ours in SAME_MEANING.items():
        _alias(parser, theirs, ours)
    g = parser.add_argument_group("diffusers' train_controlnet.py spellings with a different form")
    for theirs, ours in SEVERAL_VALUES.items():
        dest = parser._option_string_actions[ours].dest
        g.add_argument(theirs, dest=dest, nargs="+", action="extend", default=argparse.SUPPRESS,
                       metavar=ours.lstrip("-").split("-")[-1].upper(),
                       help=f"as {ours}, with several values after one flag (diffusers' form)")
    g.add_argument("--use_8bit_adam", dest="optim.optimizer", action="store_const", const="adamw8bit",
                   default=argparse.SUPPRESS, help="same as --optimizer adamw8bit (already the default)")
    for theirs, advice in NOT_HERE.items():
        parser.add_argument(theirs, nargs="*", action=_Refuse, advice=advice, help=argparse.SUPPRESS)


def _alias(parser: argparse.ArgumentParser, theirs: str, ours: str) -> None:
    """Make `theirs` a second option string of the action behind `ours` (same dest, type and default)."""
    if theirs == ours or theirs in parser._option_string_actions:
        return
    action = parser._option_string_actions[ours]
    action.option_strings.append(theirs)
    parser._option_string_actions[theirs] = action


class _Refuse(argparse.Action):
    """A diffusers flag with no counterpart: stop with status 2 and say what to use instead."""

    def __init__(self, option_strings, dest, advice: str = "", **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.advice = advice

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} (diffusers' train_controlnet.py) does not apply here: {self.advice}")


METAVARS = {int: "N", float: "X"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' except for required flags and flags whose help already says the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or "default" in text or action.default in (None, argparse.SUPPRESS, []):
            return text
        return super()._get_help_string(action)


@functools.cache
def _classes(source: Path) -> dict[str, dict[str, str]]:
    """Class name -> {field: the docstring under its declaration} for the dataclasses in `source`."""
    tree = ast.parse(source.read_text())
    found = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        docs = found.setdefault(cls.name, {})
        for decl, doc in zip(cls.body, cls.body[1:], strict=False):
            if isinstance(decl, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                docs[decl.target.id] = " ".join(str(doc.value.value).split())
    return found


def class_field_docs(source: Path, class_name: str) -> dict[str, str]:
    """{field: docstring} of one dataclass in a source file."""
    return _classes(source).get(class_name, {})


def field_docs() -> dict[str, str]:
    """`section.field` (and top-level `field`) -> the docstring under its declaration in trainer/config.py."""
    sections = {"DataConfig": "data.", "ModelConfig": "model.", "OptimConfig": "optim.",
                "CheckpointConfig": "checkpoint.", "ValidationConfig": "validation.", "TrainConfig": ""}
    config = Path(__file__).with_name("config.py")
    return {prefix + k: v for name, prefix in sections.items() for k, v in class_field_docs(config, name).items()}


def document(parser: argparse.ArgumentParser) -> None:
    """Help text from the config's docstrings where a flag has none; metavars without the section prefix."""
    docs = field_docs()
    for action in parser._actions:
        if action.help is None and action.dest in docs:
            action.help = docs[action.dest].replace("%", "%%")
        if action.metavar is None and action.nargs != 0 and action.choices is None and action.option_strings:
            action.metavar = METAVARS.get(action.type, action.dest.rsplit(".", 1)[-1].upper())
    parser.formatter_class = HelpFormatter
