"""Data for lmjax: SentencePiece tokenizers, a TFDS builder for local text, the tf.data pipeline.

TensorFlow and tensorflow_datasets are imported only when a pipeline or dataset is built, with
every accelerator hidden from TensorFlow.
"""
from lmjax.data.packing import BATCH_KEYS, rows_from_windows
from lmjax.data.pipeline import DataStateError, Pipeline, make_pipeline
from lmjax.data.tokenizer import Tokenizer, load_tokenizer, prepare_tokenizer, train_tokenizer

__all__ = ["BATCH_KEYS", "DataStateError", "Pipeline", "Tokenizer", "load_tokenizer",
           "make_pipeline", "prepare_tokenizer", "rows_from_windows", "train_tokenizer"]
