"""ctrlnet-forge's lean ControlNet trainer (python -m trainer)."""

from trainer.quiet import install_filters

install_filters()  # before any diffusers pipeline import: see trainer/quiet.py
