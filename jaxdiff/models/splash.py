"""Splash (flash) attention for TPU: the Pallas kernel, keys padded to its block size, sharded with shard_map.

`jax.experimental.pallas.ops.tpu.splash_attention` never materialises the [Lq, Lk] logits: at SD's 64x64 latents
(4096 queries) XLA attention holds 8 heads x 4096 x 4096 probabilities per image for the backward pass, splash
attention a [Lq] log-sum-exp. The kernel works on one example's [H, L, D]; this module

- scales q by 1/sqrt(D) (the kernel applies no scale), vmaps the kernel over the batch;
- pads the keys to a multiple of the kv block (CLIP's 77 tokens -> 128) and masks the padding with segment ids
  (queries segment 0, padded keys segment 1), so cross-attention runs on the same kernel;
- partitions it over the mesh that `sharded_over(mesh)` names while the program is traced (or JAX's abstract mesh,
  `jax.set_mesh`): the batch over the mesh's batch axes, heads over "tensor" when they divide. A Pallas call is a
  custom call the SPMD partitioner cannot split: without a mesh it runs on whole (replicated) operands.

On a CPU the kernel runs in Pallas' interpret mode (tests compare it with XLA attention there); `supported`
says which shapes it takes (queries a multiple of 128, no explicit mask).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

# The kernel's smallest tile along the sequence (TPU lanes): queries must be a multiple, keys are padded to one.
BLOCK = 128
# The largest block tried: fewer, larger grid steps on long sequences.
MAX_BLOCK = 512
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"

_MESH: contextvars.ContextVar = contextvars.ContextVar("jaxdiff_attention_mesh", default=None)


@contextlib.contextmanager
def sharded_over(mesh):
    """While a program is traced inside this block, splash attention is partitioned over `mesh` (None: not)."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def traced_over(mesh, fn):
    """`fn` whose tracing happens inside `sharded_over(mesh)` (wrap a step before jax.jit)."""

    def wrapped(*args, **kwargs):
        with sharded_over(mesh):
            return fn(*args, **kwargs)

    wrapped.__name__ = getattr(fn, "__name__", "step")
    wrapped.__doc__ = getattr(fn, "__doc__", None)
    return wrapped


def current_mesh():
    """The mesh of `sharded_over`, else JAX's abstract mesh when one with devices is set, else None."""
    mesh = _MESH.get()
    if mesh is not None:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    return None if abstract is None or abstract.empty else abstract


def supported(q, k=None, mask=None) -> bool:
    """Whether the kernel takes queries q [B, Lq, H, D] (and keys k [B, Lk, H, D]): Lq a multiple of 128, no mask."""
    return mask is None and q.shape[1] % BLOCK == 0 and (k is None or q.shape[-1] == k.shape[-1])


def _block(length: int) -> int:
    block = MAX_BLOCK
    while length % block:
        block //= 2
    return block


def attention(q, k, v, *, interpret: bool = False):
    """softmax(q k^T / sqrt(D)) v for q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] (float32 statistics)."""
    if not supported(q, k):
        raise ValueError(f"splash attention needs queries a multiple of {BLOCK} long, got q {q.shape}")
    mesh = current_mesh()
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return _attention(q, k, v, interpret)
    batch_axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    if q.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = ()  # a batch the axes do not divide (one prompt with CFG): every device runs all of it
    tensor = mesh.shape.get(HEAD_AXIS, 1)
    head_axis = HEAD_AXIS if tensor > 1 and q.shape[2] % tensor == 0 else None
    spec = PartitionSpec(batch_axes or None, None, head_axis, None)
    fn = jax.shard_map(
        lambda q, k, v: _attention(q, k, v, interpret),
        mesh=mesh,
        in_specs=(spec, spec, spec),
        out_specs=spec,
        check_vma=False,  # the Pallas call declares no varying axes
    )
    return fn(q, k, v)


def _attention(q, k, v, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    _, lq, heads, dim = q.shape
    lk = k.shape[1]
    lk_padded = -(-lk // BLOCK) * BLOCK
    q = (q * (1.0 / math.sqrt(dim))).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, H, L, D]
    k, v = (jnp.pad(x, ((0, 0), (0, lk_padded - lk), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (k, v))
    bq, bkv = _block(lq), _block(lk_padded)
    sizes = kernel.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    full = masks.MultiHeadMask([masks.FullMask((lq, lk_padded)) for _ in range(heads)])
    fn = kernel.make_splash_mha(full, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    if lk_padded != lk:
        ids = kernel.SegmentIds(q=jnp.zeros((lq,), jnp.int32), kv=(jnp.arange(lk_padded) >= lk).astype(jnp.int32))
        out = jax.vmap(lambda a, b, c: fn(a, b, c, segment_ids=ids))(q, k, v)
    else:
        out = jax.vmap(fn)(q, k, v)
    return out.transpose(0, 2, 1, 3)
