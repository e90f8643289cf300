"""lmjax: a JAX pretraining stack for decoder-only language models."""

__version__ = "0.1.0"
