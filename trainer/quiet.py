"""A quiet console: no library notice a user cannot act on, no progress bar for what takes no time.

Each fix is as narrow as its cause. Casts of models with nothing to keep in float32 go through torch's own
Module.to (diffusers' cast warns on every call; trainer/models.py `place`). Loading bars of diffusers and transformers are switched off only while models
load (`loading`); the hub's download bars stay. One transformers notice and one bitsandbytes notice are dropped (`_NoTorchvision`, `_NoHubKernel`).
"""

from __future__ import annotations

import contextlib
import logging


class _NoTorchvision(logging.Filter):
    """Drops transformers' "`XImageProcessor` requires torchvision (not installed); falling back to
    `XImageProcessorPil`" notice, logged when diffusers imports its pipelines. The fallback is what
    this trainer wants (validation and generation give the pipeline images, not processor outputs),
    and its advice cannot be taken on a CPU torch: torchvision's wheels pin a torch build, so
    installing one replaces the CPU torch with a CUDA build (or fails to load its operators)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


class _NoHubKernel(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning, logged on
    import on CPUs with AVX512-BF16 when the `kernels` package (a dependency of transformers) is installed:
    bitsandbytes then asks the Hub for a 4-bit matmul kernel, which this trainer never calls (its 8-bit
    optimizer has kernels of its own), and the advice it gives (`pip install kernels`) is already taken."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load CPU gemm_4bit_forward" not in record.getMessage()


FILTERS = {"transformers.utils.import_utils": _NoTorchvision, "bitsandbytes.backends.cpu.ops": _NoHubKernel}


def install_filters() -> None:
    """Attach the filters above to the one logger each notice comes from (idempotent)."""
    for name, kind in FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


@contextlib.contextmanager
def loading():
    """diffusers' and transformers' progress bars off while models load or save (restored after).

    Their bars ("Loading pipeline components", "Loading weights", "Writing model shards") tick over
    components that load in a moment; the hub's download bars, which do show a wait, are kept on."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    hub_on = not are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # also switches the hub's bars off: switched back on below
    if hub_on:
        enable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()
        if not hub_on:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
