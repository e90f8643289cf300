"""Causal grouped-query attention with packed-document masking, behind one entry point.

Implementations:
  * ``xla``: einsum/softmax in float32, runs everywhere; long sequences are split into
    128-row query blocks that skip the fully masked key blocks above the diagonal.
  * ``pallas_gpu``: lmjax's Pallas (Triton) flash-attention kernels (`flash_gpu`): causal
    masking, segment ids, sliding window and soft cap inside the kernel, grouped-query heads
    read in place, forward and backward, float32 and bfloat16, tiles sized for the GPU's
    shared memory; no [T, T] mask or score matrix in memory.
  * ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)``,
    cuDNN flash attention: bfloat16/float16 only and one document per row (cuDNN's API
    takes lengths, not segment ids), so ``auto`` never picks it.
  * ``splash``: the Pallas TPU splash-attention kernel (TPU only).
  * ``auto``: splash on TPU, pallas_gpu on GPU, xla elsewhere or when the sequence length
    is not a multiple of the kernel's block (prefill pads the prompt to it instead:
    `prefill_attention`).

`Scores` says how the scores are formed: their scale, a tanh soft cap and a sliding window
(Mistral, Gemma). xla, splash and pallas_gpu implement all three, cudnn the scale and the
window.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lmjax.config import ATTENTION_IMPLS
from lmjax.model import flash_gpu
from lmjax.parallel import sharding

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Scores:
    """How attention scores are formed from q . k.

    scale: the factor on q . k; None: head_dim ** -0.5.
    softcap: >0: scores -> softcap * tanh(scores / softcap) after scaling (Gemma 2).
    window: >0: a query at index i sees the keys at indices i - window < j <= i only.
    """

    scale: float | None = None
    softcap: float = 0.0
    window: int = 0

    def factor(self, head_dim: int) -> float:
        return head_dim**-0.5 if self.scale is None else self.scale

    def cap(self, scores):
        """scores (float32) soft-capped when `softcap` > 0, else unchanged."""
        if self.softcap <= 0:
            return scores
        return self.softcap * jnp.tanh(scores / self.softcap)


PLAIN = Scores()


def make_mask(q_segment_ids, kv_segment_ids, q_index, kv_index, window: int = 0):
    """Boolean attention mask, True where a query may attend to a key.

    Args:
      q_segment_ids: [batch, q_len] int document ids of the queries (None: one document).
      kv_segment_ids: [batch, kv_len] int document ids of the keys (None: one document).
      q_index: [batch, q_len] or [q_len] absolute position of each query in the sequence.
      kv_index: [kv_len] absolute position of each key.
      window: >0: a query sees only the `window` most recent positions (itself included).
    Returns:
      [batch, q_len, kv_len] bool (batch is 1 when nothing depends on it).
    """
    q_index = jnp.atleast_2d(q_index)
    mask = q_index[:, :, None] >= kv_index[None, None, :]
    if window > 0:
        mask = mask & (q_index[:, :, None] - kv_index[None, None, :] < window)
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def _xla(q, k, v, mask, spec: Scores = PLAIN):
    """q: [b, t, h, d]; k, v: [b, s, kv, d]; mask: [b|1, t, s] -> [b, t, h, d]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = spec.cap(scores * spec.factor(d))
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


XLA_BLOCK = 128  # query rows per block of the block-causal XLA path
SPLASH_BLOCKS = (512, 256, 128)  # splash's tiles, largest first: the largest dividing both lengths


def _xla_causal(q, k, v, segment_ids, spec: Scores = PLAIN):
    """Causal attention that skips the key blocks above the diagonal (and, with a sliding
    window, the blocks wholly before it).

    Query block i (XLA_BLOCK rows) attends only to keys [0, (i + 1) * XLA_BLOCK): with n
    blocks this computes (n + 1) / 2n of the full score matrix (62% at n = 4), exactly.
    q: [b, t, h, d]; k, v: [b, t, kv, d]; segment_ids: [b, t] or None -> [b, t, h, d].
    """
    t = q.shape[1]
    if t % XLA_BLOCK or t <= XLA_BLOCK:
        index = jnp.arange(t)
        return _xla(q, k, v, make_mask(segment_ids, segment_ids, index, index, spec.window), spec)
    outs = []
    for start in range(0, t, XLA_BLOCK):
        end = start + XLA_BLOCK
        first = max(0, start - spec.window + 1) // XLA_BLOCK * XLA_BLOCK if spec.window else 0
        seg_q = None if segment_ids is None else segment_ids[:, start:end]
        seg_k = None if segment_ids is None else segment_ids[:, first:end]
        mask = make_mask(seg_q, seg_k, jnp.arange(start, end), jnp.arange(first, end), spec.window)
        outs.append(_xla(q[:, start:end], k[:, first:end], v[:, first:end], mask, spec))
    return jnp.concatenate(outs, axis=1)


def _cudnn(q, k, v, segment_ids, spec: Scores = PLAIN):
    """cuDNN flash attention through jax.nn: causal by the kernel's own mask, no mask array."""
    if spec.softcap > 0:
        raise ValueError(_lacks("cudnn", "soft-capping"))
    if q.dtype not in (jnp.bfloat16, jnp.float16) or segment_ids is not None:
        raise ValueError(
            f"model.attention=cudnn takes bfloat16/float16 inputs and no packed "
            f"documents (got {q.dtype}, segment ids {segment_ids is not None}): use "
            f"model.attention=pallas_gpu (or auto), or data.packing=false with "
            f"model.dtype=bfloat16"
        )
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=spec.factor(q.shape[-1]),
        is_causal=True,
        local_window_size=(spec.window - 1, 0) if spec.window else None,
        implementation="cudnn",
    )


def _lacks(impl: str, what: str) -> str:
    return (
        f"model.attention={impl} implements no attention {what}: use model.attention=pallas_gpu "
        "or xla, or auto (which picks pallas_gpu on GPUs)"
    )


def _pallas_gpu_local(q, k, v, segment_ids, spec: Scores = PLAIN, *, tiles=None, interpret=False):
    """lmjax's Pallas GPU flash kernel on one device's heads: q [b, t, h, d]; k, v [b, t, kv, d]
    with local query head j reading kv head j // (h / kv) in place; segment_ids [b, t] or None.
    `tiles`: (forward, backward) `flash_gpu.Tiles`; None: picked for the GPU compiled for."""
    if q.shape[1] % 16:
        raise ValueError(
            f"model.attention=pallas_gpu needs data.seq_len divisible by 16 (got "
            f"{q.shape[1]}): change data.seq_len or use model.attention=xla"
        )
    return flash_gpu.flash_attention(
        q,
        k,
        v,
        segment_ids,
        scale=spec.factor(q.shape[-1]),
        softcap=spec.softcap,
        window=spec.window,
        tiles=tiles,
        interpret=interpret,
    )


@functools.cache
def _splash_kernel(
    q_len: int, kv_len: int, heads: int, spec: Scores = PLAIN, interpret: bool = False
):
    """A causal splash-attention kernel over q [heads, q_len, head_dim] (already scaled) and
    k, v [kv_heads, kv_len, head_dim] (one batch row; grouped-query when kv_heads < heads),
    with `spec`'s sliding window as a local mask and its soft cap.
    `interpret` runs the Pallas kernel in the interpreter (any backend, for tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
        splash_attention_mask as sm,
    )

    block = next((b for b in SPLASH_BLOCKS if q_len % b == 0 and kv_len % b == 0), None)
    if block is None:
        raise ValueError(
            f"splash attention needs sequence lengths divisible by {SPLASH_BLOCKS[-1]} (got {q_len}, "
            f"{kv_len}): change data.seq_len or use model.attention=xla"
        )
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    shape = (q_len, kv_len)
    one = sm.LocalMask(shape, (spec.window - 1, 0), 0) if spec.window else sm.CausalMask(shape)
    mask = sm.MultiHeadMask([one] * heads)
    # Concrete (not traced) mask tables, so the cached kernel never holds a tracer.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha_single_device(
            mask,
            block_sizes=sizes,
            attn_logits_soft_cap=spec.softcap or None,
            interpret=interpret,
        )


def _splash_local(q, k, v, segment_ids, spec: Scores = PLAIN, *, interpret: bool = False):
    """The TPU splash kernel on one device's heads (arguments as `_pallas_gpu_local`)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    kernel = _splash_kernel(q.shape[1], k.shape[1], q.shape[2], spec, interpret)
    q = q * jnp.asarray(spec.factor(q.shape[-1]), q.dtype)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if segment_ids is not None:
        out = jax.vmap(kernel)(qt, kt, vt, segment_ids=sk.SegmentIds(q=segment_ids, kv=segment_ids))
    else:
        out = jax.vmap(kernel)(qt, kt, vt)
    return out.transpose(0, 2, 1, 3)


def _per_device(local, q, k, v, segment_ids):
    """`local(q, k, v, segment_ids)` on each device's batch rows and heads, whole sequences.

    Pallas kernels cannot be partitioned by XLA, so under a mesh they run per device
    (shard_map). A kernel pairs local query head j with local kv head j // (local heads /
    local kv heads), which is right only when kv heads are split exactly like query heads;
    under any other layout each device receives every kv head and keeps those its query
    heads use (`_kv_for_local_heads`).
    q: [b, t, h, d]; k, v: [b, s, kv, d]; segment_ids: [b, t] or None -> [b, t, h, d].
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    head_axes = sharding.active_mesh_axes("act_heads")
    split = math.prod(head_axes.values())
    aligned = sharding.active_mesh_axes("act_kv_heads") == head_axes and kv_heads % split == 0

    def per_device(q, k, v, *seg):
        if not aligned:
            k, v = _kv_for_local_heads(k, v, heads, q.shape[2], head_axes)
        return local(q, k, v, seg[0] if seg else None)

    # shard_map needs blocks of equal size: a batch that the batch devices do not divide (a
    # generation batch of 1 prompt on 8 chips) goes whole to every device, which then runs
    # all its rows for its own heads.
    rows = "act_batch" if sharding.splits_evenly(q.shape[:1], ("act_batch",)) else None
    q_axes = (rows, None, "act_heads", None)
    kv_axes = (rows, None, "act_kv_heads" if aligned else None, None)
    args, in_axes = (q, k, v), [q_axes, kv_axes, kv_axes]
    if segment_ids is not None:
        args, in_axes = args + (segment_ids.astype(jnp.int32),), in_axes + [(rows, None)]
    return sharding.shard_map_logical(per_device, in_axes, q_axes)(*args)


def _splash(q, k, v, segment_ids, spec: Scores = PLAIN, *, interpret: bool = False):
    local = functools.partial(_splash_local, spec=spec, interpret=interpret)
    return _per_device(local, q, k, v, segment_ids)


def _pallas_gpu(q, k, v, segment_ids, spec: Scores = PLAIN, *, tiles=None, interpret=False):
    local = functools.partial(_pallas_gpu_local, spec=spec, tiles=tiles, interpret=interpret)
    return _per_device(local, q, k, v, segment_ids)


def _kv_for_local_heads(k, v, heads: int, local_heads: int, head_axes: dict[str, int]):
    """Inside shard_map: the kv heads that this device's query heads use, in kernel order.

    k, v: [b, s, kv, d], every kv head; this device holds query heads [r*L, (r+1)*L) with
    L = local_heads and r its index along `head_axes`. Global query head i uses kv head
    i // (heads / kv). Returns k, v [b, s, n, d] with local query head j using local kv head
    j // (L / n): a contiguous slice when the groups line up with the shards, else one kv head
    per query head.
    """
    group = heads // k.shape[2]
    shard: int | jax.Array = 0
    for name, size in head_axes.items():
        shard = shard * size + jax.lax.axis_index(name)
    first = shard * local_heads
    if local_heads % group == 0 or group % local_heads == 0:
        count = max(1, local_heads // group)
        return (jax.lax.dynamic_slice_in_dim(x, first // group, count, axis=2) for x in (k, v))
    index = (first + jnp.arange(local_heads)) // group
    return (jnp.take(x, index, axis=2) for x in (k, v))


# The platform each kernel runs on (jax's backend name); xla runs anywhere, and `auto` picks
# what the platform runs.
KERNEL_PLATFORM = {"pallas_gpu": "gpu", "cudnn": "gpu", "splash": "tpu"}


def runs_on(impl: str, backend: str) -> bool:
    """Whether model.attention=`impl` can run on `backend` (cpu, gpu, tpu)."""
    return KERNEL_PLATFORM.get(impl, backend) == backend


# Sequence lengths each Pallas kernel's block sizes need (see `_splash_kernel`, `_pallas_gpu_local`).
_KERNEL_SEQ_MULTIPLE = {"splash": SPLASH_BLOCKS[-1], "pallas_gpu": 16}


def resolve_impl(impl: str, backend: str | None = None, seq_len: int | None = None) -> str:
    """Maps ``auto`` to the implementation for `backend` (default: jax's default backend):
    the backend's kernel, or xla when `seq_len` does not fit the kernel's blocks."""
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    impl = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "splash"}.get(
        backend, "xla"
    )
    if seq_len is not None and seq_len % _KERNEL_SEQ_MULTIPLE.get(impl, 1):
        return "xla"
    return impl


def attention(q, k, v, *, segment_ids=None, impl: str = "auto", spec: Scores = PLAIN):
    """Causal self-attention over a full sequence (training and prefill).

    Args:
      q: [batch, seq, heads, head_dim]
      k, v: [batch, seq, kv_heads, head_dim]; heads % kv_heads == 0 (grouped-query).
      segment_ids: [batch, seq] int document ids; tokens attend only within their document.
      impl: one of `config.ATTENTION_IMPLS`.
      spec: the scores' scale, soft cap and sliding window.
    Returns:
      [batch, seq, heads, head_dim] in q's dtype.
    """
    impl = resolve_impl(impl, seq_len=q.shape[1])
    if impl == "splash":
        return _splash(q, k, v, segment_ids, spec).astype(q.dtype)
    if impl == "pallas_gpu":
        return _pallas_gpu(q, k, v, segment_ids, spec).astype(q.dtype)
    if impl == "xla":
        return _xla_causal(q, k, v, segment_ids, spec).astype(q.dtype)
    if impl == "cudnn":
        return _cudnn(q, k, v, segment_ids, spec)
    raise ValueError(f"unknown attention implementation {impl!r}: use one of {ATTENTION_IMPLS}")


# The multiple each kernel's prefill pads a prompt to: its largest block, so that a long
# prompt gets the kernel's fastest tiles for at most one block of padding per layer.
_PREFILL_MULTIPLE = {"splash": SPLASH_BLOCKS[0], "pallas_gpu": flash_gpu.BLOCKS[0]}


def prefill_attention(q, k, v, *, impl: str = "auto", spec: Scores = PLAIN):
    """Causal self-attention of right-padded prompts (prefill), by the implementation training
    uses (`attention`), whatever the prompt length: for a Pallas kernel, q, k and v are padded
    at the end to `_PREFILL_MULTIPLE` and the output cut back, since a causal query never
    reads a later key, so the padding changes no row. `auto` is XLA only on a platform with
    no kernel (the CPU); cudnn keeps its limits (bfloat16, no soft cap) and raises on them
    as in training.

    q: [batch, t, heads, head_dim]; k, v: [batch, t, kv_heads, head_dim] -> like q.
    """
    impl = resolve_impl(impl)
    t = q.shape[1]
    pad = -t % _PREFILL_MULTIPLE.get(impl, 1)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    return attention(q, k, v, impl=impl, spec=spec)[:, :t]


def attention_with_mask(q, k, v, mask, spec: Scores = PLAIN):
    """Attention under an explicit mask (decoding against a KV cache): XLA on every platform,
    as a step's few queries against the cache form a score matrix of [q_len, slots] only,
    which the kernels (self-attention over whole sequences) do not take.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
      mask: [batch, q_len, kv_len] bool (the caller applies `spec.window` to it).
      spec: the scores' scale and soft cap.
    Returns:
      [batch, q_len, heads, head_dim]
    """
    return _xla(q, k, v, mask, spec).astype(q.dtype)
