"""Data for lmjax: SentencePiece tokenizers, preparation into a pre-tokenized store, batches.

TensorFlow (tf.io.gfile for local and gs:// paths) and tensorflow_datasets are imported on
first use, with every accelerator hidden from TensorFlow.
"""

from lmjax.batch import BATCH_KEYS
from lmjax.data.packing import rows_from_windows
from lmjax.data.pipeline import DataStateError, Pipeline, make_pipeline, synthetic_batch
from lmjax.data.prepare import prepare_tokenizer
from lmjax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BATCH_KEYS",
    "DataStateError",
    "Pipeline",
    "Tokenizer",
    "load_tokenizer",
    "make_pipeline",
    "prepare_tokenizer",
    "rows_from_windows",
    "synthetic_batch",
    "train_tokenizer",
]
