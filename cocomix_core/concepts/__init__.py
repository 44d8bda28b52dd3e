"""Concepts (SPEC §2, §8): pretrained teachers, the TopK SAE and its fitting, labels picked by attribution; the `concepts` stage."""
