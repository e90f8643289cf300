"""The batch format: the dtype table and the abstract batch agree with what the pipeline
really produces, and the data layer still loads without jax."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lmjax import batch as batch_lib
from lmjax.data.pipeline import synthetic_batch


@pytest.mark.parametrize("pack", [True, False])
def test_a_pipeline_batch_has_the_keys_shapes_and_dtypes_of_the_abstract_batch(pack):
    real = synthetic_batch(0, 0, 0, range(3), 16, 256, pack)
    assert {k: str(v.dtype) for k, v in real.items()} == batch_lib.BATCH_DTYPES
    abstract = batch_lib.abstract_batch(3, 16)
    assert list(abstract) == list(batch_lib.BATCH_KEYS)
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
        k: (v.shape, v.dtype) for k, v in real.items()
    }


def test_the_abstract_batch_carries_its_sharding():
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    rows = NamedSharding(mesh, PartitionSpec("data"))
    assert all(s.sharding == rows for s in batch_lib.abstract_batch(4, 8, rows).values())
    assert all(s.sharding is None for s in batch_lib.abstract_batch(4, 8).values())


def test_select_keeps_the_batch_keys_and_names_missing_ones():
    real = synthetic_batch(0, 0, 0, range(2), 8, 64)
    assert batch_lib.select({**real, "extra": np.zeros(1)}).keys() == set(batch_lib.BATCH_KEYS)
    with pytest.raises(ValueError, match=r"eval batch lacks \['loss_mask'\]"):
        batch_lib.select({k: v for k, v in real.items() if k != "loss_mask"}, "eval batch")


def test_the_data_layer_and_the_batch_format_load_without_jax():
    # abstract_batch imports jax inside the function so that this stays true.
    code = "import sys, lmjax.batch, lmjax.data; assert 'jax' not in sys.modules, 'jax loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
