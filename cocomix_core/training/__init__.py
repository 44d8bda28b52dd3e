"""Training: the loop (NTP, CoCoMix, KD, pause), distillation targets, checkpoints and trainer state; the `train` stage."""
