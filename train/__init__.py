"""Distil heads from a frozen target (accelerate launch train/distill.py)."""
