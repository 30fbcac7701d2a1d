"""Quantization: observers, range selection, FakeQuant."""
