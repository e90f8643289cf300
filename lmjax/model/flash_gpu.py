"""Flash attention for NVIDIA GPUs as Pallas (Triton) kernels, forward and backward.

Causal, with packed documents (segment ids), a sliding window and a tanh soft cap inside the
kernels, and grouped-query heads read in place: query head i reads kv head i // group through
the BlockSpec index maps, so K and V are never copied per query head. The backward pass is two
kernels: dK/dV on a grid over kv heads (each program loops over the query heads of its group
and sums their contributions), and dQ on a grid over query heads.

Tile sizes come from `pick_tiles`: the largest query and key blocks whose tiles, with the key
(or query) tiles held in `num_stages` pipeline buffers, fit the chip's shared memory
(`lmjax.hardware.SHARED_MEMORY_PER_BLOCK`).

Shapes: q [b, t, h, d]; k, v [b, t, kv, d] with h % kv == 0; segment ids [b, t] int32;
the softmax statistic lse [b, h, t] float32 (natural log).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lmjax import hardware

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
BLOCKS = (128, 64, 32, 16)  # Triton's dots need power-of-two tiles of at least 16
MAX_STAGES = 4
BACKWARD_MAX_BLOCK = 64  # two float32 accumulators (dK, dV) live in registers per program


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: query and key rows per tile, pipeline buffers, warps."""

    block_q: int
    block_k: int
    num_stages: int
    num_warps: int


def tile_bytes(
    block_q: int, block_k: int, stages: int, head_dim: int, itemsize: int, *, backward: bool = False
) -> int:
    """Shared memory of one program, as modelled here (bytes).

    Forward: the q tile [block_q, d] once, the k and v tiles [block_k, d] in `stages`
    buffers, and the probabilities [block_q, block_k] staged once for p @ v. Backward (square
    tiles, block_q == block_k): two resident tiles (k, v for dK/dV; q, dO for dQ), two
    streamed tiles in `stages` buffers, and the [block, block] probability/ds tile.
    """
    resident, streamed = (2 * block_k, 2 * block_q) if backward else (block_q, 2 * block_k)
    return itemsize * (head_dim * (resident + stages * streamed) + block_q * block_k)


def _warps(accumulator_elements: int) -> int:
    """4 to 8 warps, so that the float32 accumulators take at most 64 registers a thread."""
    return min(8, max(4, accumulator_elements // (64 * 32)))


def pick_tiles(
    seq_len: int, head_dim: int, itemsize: int, smem_bytes: int, *, backward: bool = False
) -> Tiles:
    """The largest tiles (block_q first, then block_k) dividing `seq_len` whose `tile_bytes`
    fit `smem_bytes` with at least two pipeline stages (double buffering), then as many
    stages (up to MAX_STAGES) as fit. Backward tiles are square and at most
    BACKWARD_MAX_BLOCK rows. Warps from the accumulator size (`_warps`)."""
    blocks = [b for b in BLOCKS if seq_len % b == 0]
    if backward:
        pairs = [(b, b) for b in blocks if b <= BACKWARD_MAX_BLOCK]
    else:
        pairs = [(q, k) for q in blocks for k in blocks if k <= q]
    for block_q, block_k in pairs:

        def fits(stages, block_q=block_q, block_k=block_k):
            size = tile_bytes(block_q, block_k, stages, head_dim, itemsize, backward=backward)
            return size <= smem_bytes

        if fits(2):
            stages = max(s for s in range(2, MAX_STAGES + 1) if fits(s))
            accumulators = (2 * block_k if backward else block_q) * head_dim
            return Tiles(block_q, block_k, stages, _warps(accumulators))
    raise ValueError(
        f"model.attention=pallas_gpu: no tiles of {BLOCKS} rows divide data.seq_len={seq_len} "
        f"and fit {smem_bytes} bytes of shared memory at head_dim={head_dim} ({itemsize}-byte "
        "elements): use a seq_len divisible by 16, bfloat16, or model.attention=xla"
    )


def device_tiles(seq_len: int, head_dim: int, dtype) -> tuple[Tiles, Tiles]:
    """(forward, backward) tiles for the GPU being compiled for (jax's default device, or an
    abstract mesh's device when lowering ahead of time)."""
    try:
        capability = plgpu.get_gpu_info().compute_capability
    except ValueError as e:  # not compiling for a GPU
        raise ValueError(
            f"model.attention=pallas_gpu runs on NVIDIA GPUs only ({e}): use "
            "model.attention=auto (which picks the backend's kernel) or xla"
        ) from e
    smem = hardware.shared_memory_per_block(capability)
    itemsize = jnp.dtype(dtype).itemsize
    return (
        pick_tiles(seq_len, head_dim, itemsize, smem),
        pick_tiles(seq_len, head_dim, itemsize, smem, backward=True),
    )


@dataclasses.dataclass(frozen=True)
class _Config:
    """What the kernels are specialised on (static, hashable)."""

    scale: float
    softcap: float
    window: int
    forward: Tiles
    backward: Tiles
    interpret: bool


def _scores(q, k, cfg: _Config):
    """q [m, d], k [n, d] -> (scaled and capped scores, tanh(scaled / softcap) or None when
    there is no cap), both [m, n] float32."""
    s = plgpu.dot(q, k, trans_b=True) * cfg.scale
    if cfg.softcap <= 0:
        return s, None
    t = jnp.tanh(s / cfg.softcap)
    return cfg.softcap * t, t


def _allowed(q_start, k_start, rows: int, cols: int, seg_q, seg_k, window: int):
    """[rows, cols] bool: causal, inside the window, same document."""
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    ok = q_pos >= k_pos
    if window > 0:
        ok = ok & (q_pos - k_pos < window)
    if seg_q is not None:
        ok = ok & (seg_q[:, None] == seg_k[None, :])
    return ok


def _key_blocks(q_block, block_q: int, block_k: int, window: int):
    """[first, end) of the key blocks query block `q_block` sees (causal, window)."""
    end = lax.div((q_block + 1) * block_q + block_k - 1, block_k)
    if window <= 0:
        return 0, end
    return lax.div(jnp.maximum(q_block * block_q - window + 1, 0), block_k), end


def _query_blocks(k_block, block_q: int, block_k: int, window: int, seq_len: int):
    """[first, end) of the query blocks that see key block `k_block` (causal, window)."""
    first = lax.div(k_block * block_k, block_q)
    n = seq_len // block_q
    if window <= 0:
        return first, n
    return first, jnp.minimum(
        lax.div((k_block + 1) * block_k + window - 1 + block_q - 1, block_q), n
    )


def _segments(seg_ref, start, size):
    return None if seg_ref is None else seg_ref[pl.ds(start, size)]


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, cfg: _Config):
    """One query block of one head: q_ref [bq, d]; k_ref, v_ref [t, d] (its kv head);
    seg_ref [t] or None -> o_ref [bq, d], lse_ref [bq]."""
    bq, bk = cfg.forward.block_q, cfg.forward.block_k
    i = pl.program_id(0)
    q = q_ref[...]
    seg_q = _segments(seg_ref, i * bq, bq)

    def body(j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        s, _ = _scores(q, k, cfg)
        ok = _allowed(i * bq, j * bk, bq, bk, seg_q, _segments(seg_ref, j * bk, bk), cfg.window)
        s = jnp.where(ok, s, _NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        rescale = jnp.exp(m - m_new)
        v = v_ref[pl.ds(j * bk, bk), :]
        acc = acc * rescale[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l * rescale + p.sum(axis=1)

    first, end = _key_blocks(i, bq, bk, cfg.window)
    init = (
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(first, end, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _ds(q, k, v, do, lse, delta, ok, cfg: _Config):
    """Probabilities p and the gradient ds of the pre-cap scaled scores, both [m, n] f32,
    from q [m, d], k, v [n, d], dO [m, d], lse and delta [m]."""
    s, t = _scores(q, k, cfg)
    p = jnp.exp(jnp.where(ok, s, _NEG_INF) - lse[:, None])
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg):
    """One query block of one head: q_ref, do_ref [bq, d]; k_ref, v_ref [t, d];
    lse_ref, delta_ref [bq] -> dq_ref [bq, d]."""
    bq, bk = cfg.backward.block_q, cfg.backward.block_k
    i = pl.program_id(0)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    seg_q = _segments(seg_ref, i * bq, bq)

    def body(j, dq):
        k, v = k_ref[pl.ds(j * bk, bk), :], v_ref[pl.ds(j * bk, bk), :]
        ok = _allowed(i * bq, j * bk, bq, bk, seg_q, _segments(seg_ref, j * bk, bk), cfg.window)
        _, ds = _ds(q, k, v, do, lse, delta, ok, cfg)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    first, end = _key_blocks(i, bq, bk, cfg.window)
    dq = lax.fori_loop(first, end, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Config
):
    """One key block of one kv head, summed over the query heads of its group:
    q_ref, do_ref [t, group, d]; k_ref, v_ref [bk, d]; lse_ref, delta_ref [group, t]
    -> dk_ref, dv_ref [bk, d]."""
    bq, bk = cfg.backward.block_q, cfg.backward.block_k
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    seg_k = _segments(seg_ref, j * bk, bk)
    first, end = _query_blocks(j, bq, bk, cfg.window, q_ref.shape[0])

    def body(step, carry):
        dk, dv = carry
        g, i = lax.div(step, end - first), first + lax.rem(step, end - first)
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        ok = _allowed(i * bq, j * bk, bq, bk, _segments(seg_ref, i * bq, bq), seg_k, cfg.window)
        p, ds = _ds(q, k, v, do, lse_ref[g, rows], delta_ref[g, rows], ok, cfg)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[1] * (end - first), body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, name: str, tiles: Tiles, cfg: _Config, grid, in_specs, out_specs, out_shape):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages
        ),
        interpret=cfg.interpret,
        name=name,
    )


def _whole(seq_len: int, head_dim: int, group: int):
    """BlockSpecs over a [b, t, kv, d] array and a [b, t] segment-id array, for grids
    (block, batch, head): the whole sequence of query head `head`'s kv head."""
    kv = pl.BlockSpec((None, seq_len, None, head_dim), lambda _, b, h: (b, 0, h // group, 0))
    seg = pl.BlockSpec((None, seq_len), lambda _, b, h: (b, 0))
    return kv, seg


def _forward(q, k, v, segment_ids, cfg: _Config):
    """-> out [b, t, h, d] in q's dtype, lse [b, h, t] f32."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    bq = cfg.forward.block_q
    rows = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
    kv, seg = _whole(t, d, group)
    return _call(
        _forward_kernel,
        "lmjax_flash_forward",
        cfg.forward,
        cfg,
        (t // bq, b, h),
        [rows, kv, kv, None if segment_ids is None else seg],
        [rows, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
    )(q, k, v, segment_ids)


def _backward(q, k, v, segment_ids, out, lse, do, cfg: _Config):
    """-> dq [b, t, h, d], dk, dv [b, t, kv, d], in the inputs' dtypes."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    group = h // kv_heads
    bq, bk = cfg.backward.block_q, cfg.backward.block_k
    # delta_i = sum_d dO_id * O_id: the row term of the softmax gradient, [b, h, t].
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
    seg_spec = None if segment_ids is None else _whole(t, d, group)[1]

    q_rows = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
    stat_rows = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    kv = _whole(t, d, group)[0]
    dq = _call(
        _dq_kernel,
        "lmjax_flash_dq",
        cfg.backward,
        cfg,
        (t // bq, b, h),
        [q_rows, kv, kv, seg_spec, q_rows, stat_rows, stat_rows],
        q_rows,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
    )(q, k, v, segment_ids, do, lse, delta)

    # Grid over kv heads: block index g of a group-sized head block is query heads
    # [g * group, (g + 1) * group), the heads that read kv head g.
    q_group = pl.BlockSpec((None, t, group, d), lambda _, b, g: (b, 0, g, 0))
    stat_group = pl.BlockSpec((None, group, t), lambda _, b, g: (b, g, 0))
    kv_rows = pl.BlockSpec((None, bk, None, d), lambda j, b, g: (b, j, g, 0))
    dk, dv = _call(
        _dkv_kernel,
        "lmjax_flash_dkv",
        cfg.backward,
        cfg,
        (t // bk, b, kv_heads),
        [q_group, kv_rows, kv_rows, seg_spec, q_group, stat_group, stat_group],
        [kv_rows, kv_rows],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(q, k, v, segment_ids, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, cfg: _Config):
    return _forward(q, k, v, segment_ids, cfg)[0]


def _flash_fwd(q, k, v, segment_ids, cfg: _Config):
    out, lse = _forward(q, k, v, segment_ids, cfg)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(cfg: _Config, residuals, do):
    q, k, v, segment_ids, out, lse = residuals
    return (*_backward(q, k, v, segment_ids, out, lse, do, cfg), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def tile_width(head_dim: int) -> int:
    """The kernels' head width: Triton's dots take power-of-two tiles of at least 16 columns,
    so other head dims are zero-padded up to the next one (80 -> 128)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def flash_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    tiles: tuple[Tiles, Tiles] | None = None,
    interpret: bool = False,
):
    """Causal flash attention on one device.

    Args:
      q: [b, t, h, d]; k, v: [b, t, kv, d], h % kv == 0 (query head i reads kv head
        i // (h / kv)); t divisible by 16; d other than a power of two >= 16 is
        zero-padded to one (`tile_width`), at the cost of a padded copy of q, k and v.
      segment_ids: [b, t] int document ids, or None (one document a row).
      scale: the factor on q . k; softcap: >0: scores -> softcap * tanh(scores / softcap);
      window: >0: query i sees keys i - window < j <= i only.
      tiles: (forward, backward) tiles; None: `device_tiles` for the GPU compiled for.
      interpret: run the kernels in the Pallas interpreter (any backend; for tests).
    Returns:
      [b, t, h, d] in q's dtype.
    """
    t, d = q.shape[1], q.shape[3]
    width = tile_width(d)
    if width != d:  # zero columns add nothing to q . k, and give zero output columns
        pad = [(0, 0)] * 3 + [(0, width - d)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    forward, backward = tiles or device_tiles(t, width, q.dtype)
    if t % forward.block_q or t % forward.block_k or t % backward.block_q:
        raise ValueError(f"tiles {forward}, {backward} do not divide the sequence length {t}")
    cfg = _Config(float(scale), float(softcap), int(window), forward, backward, interpret)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    return _flash(q, k, v, seg, cfg)[..., :d]
