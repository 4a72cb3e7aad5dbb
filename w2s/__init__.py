"""Layers 1-2 of the project: pure math, the embedded world, configs, model hosting. No Ray here."""
