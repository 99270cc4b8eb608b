"""Reproducible comparisons of weft against baselines, run side by side on the lab."""
