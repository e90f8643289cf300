"""lmjax's Pallas GPU flash kernels: the tile picker against hand-computed rows and its own
search rules, and the kernels (Pallas interpreter on CPU) against the numpy loop, forward,
and against the XLA path's gradients, backward."""

import functools
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import hardware
from lmjax.model import attention as attn_lib, flash_gpu
from lmjax.model.flash_gpu import Tiles
from lmjax.tools import attention_check
from tests.unit.test_attention import _qkv, _reference

KiB = 1024


H100, A100, L4 = (hardware.shared_memory_per_block(cc) for cc in (90, 80, 89))


def test_tile_width_pads_head_dims_to_powers_of_two_of_at_least_16():
    assert [flash_gpu.tile_width(d) for d in (8, 16, 24, 64, 80, 96, 128, 256)] == [
        16, 16, 32, 64, 128, 128, 128, 256
    ]  # fmt: skip


def test_the_kernel_off_a_gpu_names_the_fix():
    q, k, v = (jnp.asarray(x) for x in _qkv(23, seq=32, head_dim=16))
    with pytest.raises(ValueError, match="NVIDIA GPUs only .*model.attention=auto"):
        attn_lib.attention(q, k, v, impl="pallas_gpu")


def test_shared_memory_table_rows_and_unknown_chips():
    assert (H100, A100, L4) == (227 * KiB, 163 * KiB, 99 * KiB)
    assert hardware.shared_memory_per_block(87) == 64 * KiB  # unlisted: the smallest budget


@pytest.mark.parametrize(
    "smem, itemsize, head_dim, backward, want",
    [
        # bf16, d 128: q 32 KiB + 2 stages x (k 32 + v 32) + p 32 = 192 KiB <= 227
        (H100, 2, 128, False, Tiles(128, 128, 2, 8)),
        # A100: 128x128 needs 192 > 163; 128x64: 32 + 3 x 32 + 16 = 144 (4 stages: 176)
        (A100, 2, 128, False, Tiles(128, 64, 3, 8)),
        # L4: 128x64 needs 112 > 99 at 2 stages; 128x32: 32 + 3 x 16 + 8 = 88 (4: 104)
        (L4, 2, 128, False, Tiles(128, 32, 3, 8)),
        # f32 on H100: 128x128 needs 384; 128x64: 64 + 2 x 64 + 32 = 224 (3: 288)
        (H100, 4, 128, False, Tiles(128, 64, 2, 8)),
        # d 64, bf16, L4: 128x128: 16 + 2 x 32 + 32 = 112 > 99; 128x64: 16 + 4 x 16 + 16 = 96
        (L4, 2, 64, False, Tiles(128, 64, 4, 4)),
        # backward bf16 d 128 on H100: 64x64: (2 + 4 x 2) x 16 + 8 = 168 KiB at 4 stages
        (H100, 2, 128, True, Tiles(64, 64, 4, 8)),
        # ... on L4: 64x64 at 2 stages: 6 x 16 + 8 = 104 > 99; 32x32: (2 + 4 x 2) x 8 + 2 = 82
        (L4, 2, 128, True, Tiles(32, 32, 4, 4)),
    ],
)
def test_pick_tiles_hand_computed_rows(smem, itemsize, head_dim, backward, want):
    assert flash_gpu.pick_tiles(4096, head_dim, itemsize, smem, backward=backward) == want


def _preferred_before(got: Tiles, seq_len: int, backward: bool):
    """The (block_q, block_k) pairs the picker must have tried before `got`."""
    blocks = [b for b in (128, 64, 32, 16) if seq_len % b == 0]
    if backward:
        pairs = [(b, b) for b in blocks if b <= 64]
    else:
        pairs = [(q, k) for q in blocks for k in blocks if k <= q]
    return pairs[: pairs.index((got.block_q, got.block_k))]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_pick_tiles_fit_double_buffered_and_are_the_largest_that_do(backward):
    for seq_len, head_dim, itemsize, smem in itertools.product(
        (48, 128, 4096), (64, 128, 256), (2, 4), (64 * KiB, L4, A100, H100)
    ):
        try:
            got = flash_gpu.pick_tiles(seq_len, head_dim, itemsize, smem, backward=backward)
        except ValueError as e:
            assert "model.attention=xla" in str(e)
            assert flash_gpu.tile_bytes(16, 16, 2, head_dim, itemsize, backward=backward) > smem
            continue

        size = functools.partial(
            flash_gpu.tile_bytes, head_dim=head_dim, itemsize=itemsize, backward=backward
        )

        case = (seq_len, head_dim, itemsize, smem, got)
        assert seq_len % got.block_q == 0 and got.block_q % got.block_k == 0, case
        assert 2 <= got.num_stages <= 4 and size(got.block_q, got.block_k, got.num_stages) <= smem
        assert got.num_stages == 4 or size(got.block_q, got.block_k, got.num_stages + 1) > smem
        for q, k in _preferred_before(got, seq_len, backward):
            assert size(q, k, 2) > smem, (case, q, k)
        assert got.num_warps in (4, 8)


# Small tiles over 64 or 128 tokens, so that every kernel loops over several blocks (and the
# window and documents cross block edges): forward 32 x 16, backward 16 x 16.
SMALL = (Tiles(32, 16, 2, 4), Tiles(16, 16, 2, 4))


def _check_kernel(heads, kv_heads, head_dim, dtype, packed, spec, seq=128):
    """`attention_check.compare` (values and gradients against XLA, the device check's
    tolerances) in the interpreter, and the forward against the numpy loop."""
    q, k, v = _qkv(21, batch=1, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    seg = attention_check.documents(1, seq) if packed else None
    args = [jnp.asarray(x, dtype) for x in (q, k, v)]
    seg_j = None if seg is None else jnp.asarray(seg)

    def kernel(q, k, v):
        return attn_lib._pallas_gpu(q, k, v, seg_j, spec, tiles=SMALL, interpret=True)

    result = attention_check.compare(kernel, *args, seg_j, spec)
    assert result.ok, (result.forward, result.grads, result.dtypes_ok)
    exact = _reference(*(np.asarray(a, np.float32) for a in args), seg, spec)
    tol = result.tolerance
    np.testing.assert_allclose(result.out, exact, atol=tol, rtol=tol)


def test_compare_fails_a_kernel_off_by_a_little_in_the_wrong_dtype():
    """The comparison can fail: XLA's own output shifted by 2 tolerances, in float32 for
    bfloat16 inputs (the passing side: every `_check_kernel`)."""
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(5, batch=1, seq=16, head_dim=16))

    def shifted(q, k, v):
        out = attn_lib.attention(q, k, v, impl="xla").astype(jnp.float32)
        return out + 2 * attention_check.TOLERANCE["bfloat16"]

    off = attention_check.compare(shifted, q, k, v)
    assert not off.ok and 1.5 < off.forward < 2.5 and not off.dtypes_ok


def test_kernel_gqa_packed_float32_head_dim_64():
    """Grouped-query (2 query heads on 1 kv head), three documents, float32, 64 tokens."""
    _check_kernel(2, 1, 64, jnp.float32, True, attn_lib.PLAIN, seq=64)
