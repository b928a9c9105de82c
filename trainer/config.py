"""Typed configuration of a training run: one dataclass per component, checked where it is built.

Every field is documented where it is declared; cross-field checks live in `__post_init__` and their
errors name the command-line flag to change. `TrainConfig.to_dict()` is what gets printed at start
and saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIXED_PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw8bit", "adamw")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class DataConfig:
    """Where the shards are and how a batch is made from them."""

    shards: str = ""
    """Shard pattern: local paths, brace ranges (`shards/{00000..00063}.tar`) or `pipe:` URLs; `::` joins patterns."""
    resolution: int = 512
    """Square training size in pixels; must equal the crop size the shards' stats record (else see --resize)."""
    train_batch_size: int = 4
    """Samples per micro-batch (per forward pass)."""
    proportion_empty_prompts: float = 0.5
    """Probability that a caption is replaced by the empty prompt (the ControlNet paper uses 0.5)."""
    shuffle_buffer: int = 256
    """Samples held in the in-stream shuffle buffer (shard order is shuffled per epoch as well)."""
    num_workers: int = 4
    """DataLoader worker processes that decode JPEG/PNG; 0 decodes in the training process."""
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

    model: str = ""
    """Diffusers folder or hub id of an SD 1.x/2.x model, or one original-layout .safetensors checkpoint."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of --model."""
    variant: str | None = None
    """Weight file variant of --model, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`."""
    controlnet: str | None = None
    """An existing ControlNet (folder or hub id) to continue training; default: initialise from the UNet."""
    gradient_checkpointing: bool = True
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

    def __post_init__(self) -> None:
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

    learning_rate: float = 1e-5
    """Peak learning rate of the ControlNet."""
    decoder_learning_rate: float | None = None
    """Learning rate of the unlocked UNet decoder; default: a tenth of --learning-rate."""
    optimizer: str = "adamw8bit"
    """`adamw8bit` (bitsandbytes, 8-bit states) or `adamw` (PyTorch, fp32 states)."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    adam_weight_decay: float = 1e-2
    """Decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """Adam's denominator epsilon."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm; 0 turns clipping off."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimizer step (effective batch = train batch size x this; 32+ trains better)."""
    merge_micro_batches: int = 1
    """Run this many micro-batches of an accumulation as one forward/backward pass: the same samples,
    random draws and mean loss (same math), fewer passes, more activation memory. Divides
    --gradient-accumulation-steps."""
    lr_scheduler: str = "constant"
    """Shape after warmup: constant, constant_with_warmup (same), linear (to 0) or cosine (to 0)."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to the peak learning rate."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr-scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
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

    checkpointing_steps: int = 500
    """Write a checkpoint every this many optimizer steps (and on SIGINT/SIGTERM)."""
    checkpoints_total_limit: int | None = 3
    """Keep only the newest this many checkpoints; None keeps all."""
    resume: str | None = None
    """`latest` (newest complete checkpoint in --output, if any) or a checkpoint folder."""
    export_format: str = "diffusers"
    """Key layout of the final controlnet-fp16.safetensors: diffusers, or original (lllyasviel's control_model.*)."""

    def __post_init__(self) -> None:
        if self.export_format not in ("diffusers", "original"):
            raise ValueError(f"--export-format must be diffusers or original, got {self.export_format!r}")
        if self.checkpointing_steps < 1:
            raise ValueError("--checkpointing-steps must be at least 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("--checkpoints-total-limit must be at least 1")


@dataclass
class ValidationConfig:
    """Images generated with the current ControlNet and written to output/validation/."""

    validation_steps: int = 500
    """Generate validation images every this many optimizer steps (and at the end)."""
    validation_prompt: list[str] = field(default_factory=list)
    """Prompts; paired with --validation-image one to one, or one of them broadcast to the other."""
    validation_image: list[str] = field(default_factory=list)
    """Conditioning images (paths) for the validation prompts."""
    num_validation_images: int = 2
    """Images per prompt (different seeds)."""
    num_inference_steps: int = 20
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

    output: str = ""
    """Folder for checkpoints, validation images, logs and the final ControlNet."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    max_train_steps: int = 10_000
    """Optimizer steps to train for (counting those done before a resume)."""
    mixed_precision: str = "fp16"
    """Compute dtype of the frozen parts and of autocast: no (fp32), fp16 (with a GradScaler) or bf16."""
    seed: int = 0
    """Seeds data order, caption drop, noise and timesteps: same seed and hardware, same steps."""
    device: str | None = None
    """`cuda` or `cpu`; default: cuda when available."""
    log_every: int = 10
    """Log loss, lr, samples/s and memory every this many optimizer steps (the only host syncs)."""

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("no output folder given: pass --output DIR")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"--mixed-precision must be one of {MIXED_PRECISIONS}")
        if self.device not in (None, "cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}")
        if self.device == "cpu" and self.mixed_precision == "fp16":
            raise ValueError("fp16 training needs CUDA: pass --mixed-precision no (or bf16) with --device cpu")
        if self.max_train_steps < 1:
            raise ValueError("--max-train-steps must be at least 1")
        if self.log_every < 1:
            raise ValueError("--log-every must be at least 1")

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
