"""Typed configuration of a training run: one dataclass per component, checked where it is built.

Every field is documented where it is declared; cross-field checks live in `__post_init__` and their
errors name the command-line flag to change. `TrainConfig.to_dict()` is what gets printed at start
and saved with every checkpoint. trainer/cli.py derives the command line from these fields
(engine/options.py): name, default and docstring are the flag, its default and its --help text;
`opt(...)` adds other spellings (diffusers' train_controlnet.py ones in snake_case) and choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.options import check_choices, opt

MIXED_PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw8bit", "adamw")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


def _limit(text: str) -> int | None:
    """`--checkpoints-total-limit none` (or 0) keeps every checkpoint."""
    return None if text.lower() in ("none", "0") else int(text)


@dataclass
class DataConfig:
    """Where the shards are and how a batch is made from them."""

    shards: str = field(default="", metadata=opt(required=True))
    """Shard pattern (quote it): local paths, brace ranges (`shards/{00000..00063}.tar`) or `pipe:` URLs; `::` joins patterns."""
    resolution: int = field(default=512, metadata=opt("--resolution"))
    """Square training size in pixels; must equal the crop size the shards' stats record (else see --resize)."""
    train_batch_size: int = field(default=4, metadata=opt("--train-batch-size", "--train_batch_size"))
    """Samples per micro-batch (per forward pass)."""
    proportion_empty_prompts: float = field(default=0.5, metadata=opt("--proportion-empty-prompts",
                                                                      "--proportion_empty_prompts"))
    """Probability that a caption is replaced by the empty prompt (the ControlNet paper uses 0.5)."""
    shuffle_buffer: int = 256
    """Samples held in the in-stream shuffle buffer (shard order is shuffled per epoch as well)."""
    num_workers: int = field(default=4, metadata=opt("--dataloader-num-workers", "--dataloader_num_workers"))
    """DataLoader worker processes that decode JPEG/PNG; 0 decodes in the training process."""
    pin_memory: bool = True
    """On CUDA, the DataLoader pins each batch in a thread of the training process (so its copy to the GPU
    overlaps the step); --no-pin-memory copies from the workers' shared memory instead (a synchronous copy,
    no pin thread competing with the training thread for the GIL)."""
    max_failed_batches: int = 50
    """Stop with an error naming the shard and member after this many batches in a row with no decodable sample."""
    resize: bool = False
    """Resize samples to --resolution (shorter side, then a center crop) when the shards' stats record another
    image size; without it such shards stop the run with an error naming both sizes."""

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("no shards given: pass --shards 'shards/{00000..00009}.tar'")
        if self.resolution % 8 != 0 or self.resolution <= 0:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.train_batch_size < 1:
            raise ValueError("--train-batch-size must be at least 1")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError("--proportion-empty-prompts must lie in [0, 1]")
        if self.num_workers < 0:
            raise ValueError("--dataloader-num-workers must be >= 0")
        if self.max_failed_batches < 1:
            raise ValueError("--max-failed-batches must be at least 1")


@dataclass
class ModelConfig:
    """Which Stable Diffusion model to load and how the ControlNet is set up on it."""

    model: str = field(default="", metadata=opt("--model", "--pretrained_model_name_or_path", required=True))
    """Diffusers folder or hub id of an SD 1.x/2.x model, or one original-layout .safetensors checkpoint."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of --model."""
    variant: str | None = None
    """Weight file variant of --model, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`."""
    controlnet: str | None = field(default=None, metadata=opt("--controlnet", "--controlnet_model_name_or_path"))
    """An existing ControlNet (folder or hub id) to continue training; default: initialise from the UNet."""
    gradient_checkpointing: bool = field(default=True, metadata=opt("--gradient-checkpointing",
                                                                    "--gradient_checkpointing"))
    """Recompute the ControlNet's activations in backward: compute traded for memory."""
    gradient_checkpointing_unet: bool = True
    """With --gradient-checkpointing, recompute the frozen UNet's too (gradients flow through it)."""
    unlock_decoder: bool = False
    """Train the UNet's decoder half too (the original ControlNet's sd_locked=False)."""
    only_mid_control: bool = False
    """Feed only the ControlNet's middle-block residual into the UNet (the original's only_mid_control)."""
    checkpoint_levels: int | None = None
    """With --gradient-checkpointing, recompute only the blocks at this many of the highest resolutions
    (where activations are largest; SD 1.5 has 4 levels), keep the rest; default: every level."""
    compile: bool = False
    """torch.compile the ControlNet and the UNet (minutes of compiling at start; pays on long CUDA runs)."""
    cuda_graphs: bool = False
    """torch.compile the ControlNet, the UNet and the residuals between them as one graph in mode
    "reduce-overhead": each pass's forward and backward are replayed as CUDA graphs instead of ~775 kernel
    launches from Python, which bound the compiled batch-8 step on an H200 (GPU busy 88 ms of a ~140 ms step:
    bench/RESULTS.md, train). CUDA, one process; takes the place of --compile. Measured on an H200: batch 8 with
    --checkpoint-levels 1 at 3.11x diffusers' samples/s (bench/RESULTS.md, train-graphs)."""
    channels_last: bool = False
    """Run the ControlNet and the UNet in channels-last (NHWC) memory format, the layout of Tensor Core
    convolutions on CUDA (same math; not yet measured on a GPU: bench/RESULTS.md, train)."""
    low_memory: bool = False
    """The low-memory setting (SD 1.5 in 4.1 GiB peak allocated at effective batch 4 on an H200, so a 6 GB card:
    bench/RESULTS.md): trainable weights and gradients in bf16 (no fp32 copy, no autocast), the fused 8-bit
    AdamW with stochastically rounded bf16 updates, everything checkpointed, precomputed shards on CUDA (no
    VAE/text encoder on the GPU). Implies bf16."""

    def __post_init__(self) -> None:
        if self.low_memory:
            defeats = [flag for flag, bad in (
                ("--no-gradient-checkpointing", not self.gradient_checkpointing),
                ("--no-gradient-checkpointing-unet", not self.gradient_checkpointing_unet),
                ("--checkpoint-levels", self.checkpoint_levels is not None),
                ("--unlock-decoder", self.unlock_decoder)) if bad]
            if defeats:
                raise ValueError(f"--low-memory cannot be combined with {', '.join(defeats)}: it keeps more "
                                 "activations or trains more weights than its ~4.1 GiB hold; drop them or --low-memory")
        if self.checkpoint_levels is not None and self.checkpoint_levels < 0:
            raise ValueError("--checkpoint-levels must be 0 or more")
        if not self.model:
            raise ValueError("no model given: pass --model runwayml/stable-diffusion-v1-5 or a diffusers folder")
        if Path(self.model).suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
            from trainer.single_file import convert_advice

            raise ValueError(f"--model: {convert_advice(self.model)}")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient handling."""

    learning_rate: float = field(default=1e-5, metadata=opt("--learning-rate", "--learning_rate"))
    """Peak learning rate of the ControlNet."""
    decoder_learning_rate: float | None = None
    """Learning rate of the unlocked UNet decoder; default: a tenth of --learning-rate."""
    optimizer: str = field(default="adamw8bit", metadata=opt(choices=OPTIMIZERS))
    """`adamw8bit` (bitsandbytes, 8-bit states) or `adamw` (PyTorch, fp32 states)."""
    adam_beta1: float = field(default=0.9, metadata=opt("--adam-beta1", "--adam_beta1"))
    """Adam's first-moment decay."""
    adam_beta2: float = field(default=0.999, metadata=opt("--adam-beta2", "--adam_beta2"))
    """Adam's second-moment decay."""
    adam_weight_decay: float = field(default=1e-2, metadata=opt("--adam-weight-decay", "--adam_weight_decay"))
    """Decoupled weight decay."""
    adam_epsilon: float = field(default=1e-8, metadata=opt("--adam-epsilon", "--adam_epsilon"))
    """Adam's denominator epsilon."""
    max_grad_norm: float = field(default=1.0, metadata=opt("--max-grad-norm", "--max_grad_norm"))
    """Gradients are clipped to this global norm; 0 turns clipping off."""
    gradient_accumulation_steps: int = field(default=8, metadata=opt("--gradient-accumulation-steps",
                                                                     "--gradient_accumulation_steps"))
    """Micro-batches per optimizer step (effective batch = train batch size x this; 32+ trains better)."""
    merge_micro_batches: int = 1
    """Run this many micro-batches of an accumulation as one forward/backward pass: the same samples,
    random draws and mean loss (same math), fewer passes, more activation memory. Divides
    --gradient-accumulation-steps."""
    lr_scheduler: str = field(default="constant", metadata=opt("--lr-scheduler", "--lr_scheduler",
                                                               choices=LR_SCHEDULERS))
    """Shape after warmup: constant, constant_with_warmup (same), linear (to 0) or cosine (to 0)."""
    lr_warmup_steps: int = field(default=0, metadata=opt("--lr-warmup-steps", "--lr_warmup_steps"))
    """Optimizer steps of linear warmup from 0 to the peak learning rate."""
    fused_optimizer: bool = True
    """With adamw8bit: the weights in one flat buffer and bitsandbytes' 8-bit kernel called once over it
    (trainer.fused; same math, no per-tensor launches and syncs); off: bitsandbytes' AdamW8bit per tensor."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.gradient_accumulation_steps < 1:
            raise ValueError("--gradient-accumulation-steps must be at least 1")
        if self.merge_micro_batches < 1 or self.gradient_accumulation_steps % self.merge_micro_batches:
            raise ValueError("--merge-micro-batches must be a divisor of --gradient-accumulation-steps "
                             f"({self.gradient_accumulation_steps}), got {self.merge_micro_batches}")
        if self.learning_rate <= 0:
            raise ValueError("--learning-rate must be positive")
        if self.decoder_learning_rate is None:
            self.decoder_learning_rate = self.learning_rate / 10


@dataclass
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and where to resume from."""

    checkpointing_steps: int = field(default=500, metadata=opt("--checkpointing-steps", "--checkpointing_steps"))
    """Write a checkpoint every this many optimizer steps (and on SIGINT/SIGTERM)."""
    checkpoints_total_limit: int | None = field(default=3, metadata=opt(
        "--checkpoints-total-limit", "--checkpoints_total_limit", parse=_limit, metavar="N"))
    """Keep only the newest this many checkpoints; `none` (or 0) keeps all."""
    resume: str | None = field(default=None, metadata=opt("--resume", "--resume_from_checkpoint",
                                                          metavar="{latest,PATH}"))
    """`latest` (newest complete checkpoint in --output, if any) or a checkpoint folder."""
    export_format: str = field(default="diffusers", metadata=opt(choices=("diffusers", "original")))
    """Key layout of the final controlnet-fp16.safetensors: diffusers, or original (lllyasviel's control_model.*)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.checkpointing_steps < 1:
            raise ValueError("--checkpointing-steps must be at least 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("--checkpoints-total-limit must be at least 1")


@dataclass
class ValidationConfig:
    """Images generated with the current ControlNet and written to output/validation/."""

    validation_steps: int = field(default=500, metadata=opt("--validation-steps", "--validation_steps"))
    """Generate validation images every this many optimizer steps (and at the end)."""
    validation_prompt: list[str] = field(default_factory=list, metadata=opt(metavar="TEXT"))
    """Prompts (repeat the flag); paired with --validation-image one to one, or one of them broadcast to the other."""
    validation_image: list[str] = field(default_factory=list, metadata=opt(metavar="PATH"))
    """Conditioning images (paths; repeat the flag) for the validation prompts."""
    num_validation_images: int = field(default=2, metadata=opt("--num-validation-images", "--num_validation_images"))
    """Images per prompt (different seeds)."""
    num_inference_steps: int = field(default=20, metadata=opt("--validation-inference-steps"))
    """Denoising steps per validation image (UniPC)."""
    guess_mode: bool = True
    """Also generate one image per conditioning map with the empty prompt in guess mode."""

    def __post_init__(self) -> None:
        n_p, n_i = len(self.validation_prompt), len(self.validation_image)
        if (n_p == 0) != (n_i == 0):
            raise ValueError("pass --validation-prompt and --validation-image together (or neither)")
        if n_p and n_i and n_p != n_i and 1 not in (n_p, n_i):
            raise ValueError("give one --validation-image per --validation-prompt, or one of either kind")
        if self.validation_steps < 1:
            raise ValueError("--validation-steps must be at least 1")
        missing = [p for p in self.validation_image if not Path(p).is_file()]
        if missing:
            raise ValueError(f"--validation-image: no such file: {', '.join(missing)}")

    def pairs(self) -> list[tuple[str, str]]:
        """(prompt, image path) pairs, broadcasting a single prompt or image."""
        prompts, images = self.validation_prompt, self.validation_image
        n = max(len(prompts), len(images))
        prompts = prompts * n if len(prompts) == 1 else prompts
        images = images * n if len(images) == 1 else images
        return list(zip(prompts, images, strict=True))


@dataclass
class TrainConfig:
    """A whole run: the components above plus what the loop itself needs."""

    output: str = field(default="", metadata=opt("--output", "--output_dir", required=True))
    """Folder for checkpoints, validation images, logs and the final ControlNet."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=opt(group="optimizer"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=opt(group="checkpoints"))
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    max_train_steps: int = field(default=10_000, metadata=opt("--max-train-steps", "--max_train_steps"))
    """Optimizer steps to train for (counting those done before a resume)."""
    mixed_precision: str = field(default="fp16", metadata=opt("--mixed-precision", "--mixed_precision",
                                                              choices=MIXED_PRECISIONS))
    """Compute dtype of the frozen parts and of autocast: no (fp32), fp16 (with a GradScaler) or bf16."""
    seed: int = 0
    """Seeds data order, caption drop, noise and timesteps: same seed and hardware, same steps."""
    device: str | None = field(default=None, metadata=opt(choices=("cuda", "cpu")))
    """`cuda` or `cpu`; default: cuda when available."""
    log_every: int = 10
    """Log loss, lr, samples/s and memory every this many optimizer steps (the only host syncs)."""
    progress: bool = field(default=True, metadata=opt("--no-progress", negate=True))
    """Show a progress bar (logs are written either way)."""

    def __post_init__(self) -> None:
        self._check_low_memory()
        if not self.output:
            raise ValueError("no output folder given: pass --output DIR")
        check_choices(self)
        if self.device == "cpu" and self.mixed_precision == "fp16":
            raise ValueError("fp16 training needs CUDA: pass --mixed-precision no (or bf16) with --device cpu")
        if self.max_train_steps < 1:
            raise ValueError("--max-train-steps must be at least 1")
        if self.log_every < 1:
            raise ValueError("--log-every must be at least 1")

    def _check_low_memory(self) -> None:
        """--low-memory trains in bf16 with the fused 8-bit optimizer; flags that undo that are an error."""
        if not self.model.low_memory:
            return
        if self.mixed_precision == "no":
            raise ValueError("--low-memory trains bf16 weights: drop --mixed-precision no (or drop --low-memory)")
        if self.optim.optimizer != "adamw8bit" or not self.optim.fused_optimizer:
            raise ValueError("--low-memory needs --optimizer adamw8bit with --fused-optimizer (8-bit states and "
                             "stochastically rounded bf16 updates); drop --optimizer adamw / --no-fused-optimizer")
        self.mixed_precision = "bf16"  # fp16 weights would need loss scaling and fp32 master copies

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-serialisable) of the resolved configuration."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict."""
        sections = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                    "checkpoint": CheckpointConfig, "validation": ValidationConfig}
        kw = {k: (sections[k](**v) if k in sections else v) for k, v in d.items()}
        return cls(**kw)
