"""Data for lmjax: SentencePiece tokenizers, preparation into a pre-tokenized store, batches.

Files, local or gs://, go through lmjax.storage. TensorFlow and tensorflow_datasets are
imported on first use, with every accelerator hidden from TensorFlow.

May import: lmjax.config, lmjax.errors, lmjax.batch, lmjax.storage; never jax (Beam workers import this floor
without it). Re-exports nothing: import the module you need.
"""
