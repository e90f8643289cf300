"""The GPU flash-attention kernel against the XLA path, values and gradients.

`compare` is the one home of the tolerances: tests/*/test_flash_gpu.py run it in the Pallas
interpreter (and check the forward against the numpy loop too), and `scripts/device_check.sh`
runs `python -m lmjax.tools.attention_check` on a GPU, where the kernels are compiled by Triton
with the tiles picked for that GPU's shared memory. The reference is the XLA path in float32
on the same (dtype-rounded) inputs; float32 matmuls run at "highest" precision on both sides
(IEEE float32: a TF32 reference would be no reference at 2e-5).

    python -m lmjax.tools.attention_check [--seq 1024] [--batch 2] [--interpret]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.model import attention as attn_lib, flash_gpu

# Forward: |kernel - xla| <= TOL + TOL * |xla| elementwise. Gradients (of sum(out ** 2)):
# |kernel - xla| <= GRAD_FACTOR * TOL * max |xla| (bfloat16 gradients are rounded sums of
# seq_len terms, so they are compared on the scale of the largest one).
TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2}
GRAD_FACTOR = 3


@dataclasses.dataclass(frozen=True)
class Comparison:
    out: np.ndarray  # the kernel's output, as float32
    forward: float  # max |kernel - xla| / (TOL + TOL * |xla|): passes at <= 1
    grads: dict[str, float]  # name -> max |kernel - xla| / (GRAD_FACTOR * TOL * max |xla|)
    dtypes_ok: bool  # output and gradients in the inputs' dtype
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.dtypes_ok and self.forward <= 1 and max(self.grads.values()) <= 1


def documents(batch: int, seq: int) -> np.ndarray:
    """[batch, seq] segment ids of three documents a row, the first two ending inside blocks."""
    ends = [0, seq * 2 // 5 + 1, seq * 3 // 4 - 3, seq]
    return np.repeat([[1, 2, 3]] * batch, np.diff(ends), axis=1)


def _loss_and_grads(fn: Callable, args):
    """(fn(*args), grads of sum(fn(*args) ** 2) w.r.t. every arg), jitted."""

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)


def compare(kernel: Callable, q, k, v, segment_ids=None, spec=attn_lib.PLAIN) -> Comparison:
    """`kernel(q, k, v)` against `attention(impl="xla")` in float32 on the same values.

    q [b, t, h, d], k and v [b, t, kv, d] in the dtype under test; segment_ids [b, t] or None
    (`kernel` closes over its own copy)."""
    dtype = q.dtype
    tol = TOLERANCE[jnp.dtype(dtype).name]

    def xla(q, k, v):
        return attn_lib.attention(q, k, v, segment_ids=segment_ids, impl="xla", spec=spec)

    with jax.default_matmul_precision("highest"):
        (_, out), grads = _loss_and_grads(kernel, (q, k, v))
        (_, want), want_grads = _loss_and_grads(
            xla, tuple(x.astype(jnp.float32) for x in (q, k, v))
        )
    got, want = np.asarray(out, np.float32), np.asarray(want)
    forward = float(np.max(np.abs(got - want) / (tol + tol * np.abs(want))))
    errors = {}
    for name, g, w in zip("qkv", grads, want_grads):
        w = np.asarray(w)
        scale = GRAD_FACTOR * tol * float(np.abs(w).max())
        errors[f"d{name}"] = float(np.max(np.abs(np.asarray(g, np.float32) - w)) / scale)
    dtypes_ok = out.dtype == dtype and all(g.dtype == dtype for g in grads)
    return Comparison(got, forward, errors, dtypes_ok, tol)


@dataclasses.dataclass(frozen=True)
class Case:
    head_dim: int
    dtype: str
    packed: bool
    spec: attn_lib.Scores = attn_lib.PLAIN

    @property
    def name(self) -> str:
        extra = (
            f" window {self.spec.window} softcap {self.spec.softcap}" if self.spec.window else ""
        )
        return f"d{self.head_dim} {self.dtype} {'packed' if self.packed else 'causal'}{extra}"


# head_dim 64 and 128, float32 and bfloat16, causal and packed documents, and one case with
# a sliding window and a soft cap.
CASES = [
    *(Case(d, t, p) for d in (64, 128) for t in ("float32", "bfloat16") for p in (False, True)),
    Case(128, "bfloat16", True, attn_lib.Scores(softcap=30.0, window=256)),
]


def run_case(case: Case, batch: int, seq: int, heads: int, kv_heads: int, interpret: bool):
    """(Comparison, the (forward, backward) tiles) of `case` on random inputs. On a GPU the
    kernel is compiled with the tiles `flash_gpu.device_tiles` picks; in the interpreter
    with small tiles, so that every kernel loops over several blocks."""
    rng = np.random.default_rng(case.head_dim + seq)
    shapes = [(batch, seq, n, case.head_dim) for n in (heads, kv_heads, kv_heads)]
    q, k, v = (jnp.asarray(rng.standard_normal(s), case.dtype) for s in shapes)
    seg = jnp.asarray(documents(batch, seq)) if case.packed else None
    if interpret:
        tiles = (flash_gpu.Tiles(32, 16, 2, 4), flash_gpu.Tiles(16, 16, 2, 4))
    else:
        tiles = flash_gpu.device_tiles(seq, flash_gpu.tile_width(case.head_dim), q.dtype)

    def kernel(q, k, v):
        return attn_lib._pallas_gpu(q, k, v, seg, case.spec, tiles=tiles, interpret=interpret)

    return compare(kernel, q, k, v, seg, case.spec), tiles


def main(argv: list[str] | None = None) -> int:
    """Prints a markdown table, one row a case; exit 0 when every case is within tolerance."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--interpret", action="store_true", help="the Pallas interpreter (any device)")
    p.add_argument("--cases", type=int, default=len(CASES), help="the first N cases only")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    mode = "Pallas interpreter" if args.interpret else "compiled kernels"
    print(
        f"attention kernel vs XLA on {device.device_kind} ({device.platform}), {mode}: batch "
        f"{args.batch} x seq {args.seq}, {args.heads}/{args.kv_heads} heads; errors in units of "
        f"the tolerance (pass <= 1; forward TOL + TOL |xla|, gradients {GRAD_FACTOR} TOL max|xla|, "
        f"TOL {TOLERANCE})\n"
    )
    print("| case | tiles fwd / bwd (q x k, stages, warps) | out | dq | dk | dv | s | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    failed = 0
    for case in CASES[: args.cases]:
        start = time.perf_counter()
        r, tiles = run_case(case, args.batch, args.seq, args.heads, args.kv_heads, args.interpret)
        failed += not r.ok
        shown = " / ".join(f"{t.block_q}x{t.block_k}, {t.num_stages}, {t.num_warps}" for t in tiles)
        errors = " | ".join(f"{e:.3f}" for e in (r.forward, *r.grads.values()))
        verdict = "PASS" if r.ok else "FAIL" + ("" if r.dtypes_ok else " (dtype)")
        print(
            f"| {case.name} | {shown} | {errors} | {time.perf_counter() - start:.1f} | {verdict} |",
            flush=True,
        )
    print(f"\n{failed} case(s) FAILED" if failed else "\nall cases within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
