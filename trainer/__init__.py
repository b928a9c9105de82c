"""ctrlnet-forge's lean ControlNet trainer (python -m trainer)."""

import os

from trainer.quiet import install_filters

# Under torchrun, the launcher that started this process, read before any slow import: a launcher killed while
# this process imports torch or loads the models is then still noticed (trainer.distributed.World.launcher).
PARENT_AT_START = os.getppid()

install_filters()  # before any diffusers pipeline import: see trainer/quiet.py
