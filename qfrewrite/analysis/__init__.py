"""Analyses over the IR: per-channel statistics, activation ranges."""
