"""Reporting (SPEC §10): curves per training token, verdicts, plots, the card's pages and the end-of-run text; the `report` stage."""
