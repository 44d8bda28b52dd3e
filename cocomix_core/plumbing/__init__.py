"""Plumbing shared by every stage: storage, MLflow tracking, files, progress logs, interrupts, launching, preflight."""
