"""tip: on-policy distillation with token-importance selection."""

__version__ = "0.1.0"
