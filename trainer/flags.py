"""diffusers' spellings of the trainer's flags that are not settings of their own.

diffusers' examples/controlnet/train_controlnet.py spellings that mean the same as ours are aliases
in trainer/config.py's field metadata (`opt("--learning-rate", "--learning_rate")`; SAME_MEANING
lists them). `add_diffusers_spellings(parser)` adds the rest: its flags that take several values
after one flag, `--use_8bit_adam`, and the flags with no meaning here, which exit with status 2 and
a message naming what to use instead.
"""

from __future__ import annotations

import argparse

from engine import options
from trainer.config import TrainConfig

# diffusers' spelling -> ours, where both mean the same thing: the snake_case aliases of the config's
# fields (argparse does not equate '_' and '-'). Same-spelled ones (--seed, --resolution) need none.
SAME_MEANING = {alias: names[0] for names in options.spellings(TrainConfig).values()
                for alias in names[1:] if "_" in alias}
DESTS = {name: dest for dest, names in options.spellings(TrainConfig).items() for name in names}
"""Each flag spelling of the config -> the dotted field it sets (its argparse dest)."""

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
    """Accept diffusers' several-values forms and --use_8bit_adam; reject its flags with no meaning here."""
    g = parser.add_argument_group("diffusers' train_controlnet.py spellings with a different form")
    for theirs, ours in SEVERAL_VALUES.items():
        g.add_argument(theirs, dest=DESTS[ours], nargs="+", action="extend", default=argparse.SUPPRESS,
                       metavar=ours.lstrip("-").split("-")[-1].upper(),
                       help=f"as {ours}, with several values after one flag (diffusers' form)")
    g.add_argument("--use_8bit_adam", dest="optim.optimizer", action="store_const", const="adamw8bit",
                   default=argparse.SUPPRESS, help="same as --optimizer adamw8bit (already the default)")
    for theirs, advice in NOT_HERE.items():
        parser.add_argument(theirs, nargs="*", action=_Refuse, advice=advice, help=argparse.SUPPRESS)


class _Refuse(argparse.Action):
    """A diffusers flag with no counterpart: stop with status 2 and say what to use instead."""

    def __init__(self, option_strings, dest, advice: str = "", **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.advice = advice

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} (diffusers' train_controlnet.py) does not apply here: {self.advice}")
