"""Each backend-specific formulation (im2col conv, chunked attention) equals the plain one and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import assert_parity

from jaxdiff.models import attention
from jaxdiff.models.layers import conv2d


@pytest.mark.parametrize("stride,padding", [(1, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1)))])
def test_im2col_and_native_convolution_match_torch(stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 8, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 6, 5)).astype(np.float32)
    tx = torch.nn.functional.pad(
        torch.from_numpy(x).permute(0, 3, 1, 2), (padding[1][0], padding[1][1], padding[0][0], padding[0][1])
    )
    ref = torch.nn.functional.conv2d(tx, torch.from_numpy(w).permute(3, 2, 0, 1), stride=stride).permute(0, 2, 3, 1)
    for im2col in (True, False):
        out = conv2d(jnp.asarray(x), jnp.asarray(w), stride, padding, im2col=im2col)
        assert_parity(out, ref.numpy(), rel=1e-5, what=f"conv im2col={im2col}")


@pytest.mark.parametrize("implementation", ["einsum", "chunked", "xla"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_implementations_match_torch_sdpa(implementation, masked):
    rng = np.random.default_rng(1)
    lq, lk = attention.CPU_CHUNK_ABOVE + 2 * attention.CPU_QUERY_CHUNK, 37  # forces several query chunks
    q = rng.standard_normal((2, lq, 3, 8)).astype(np.float32)
    k = rng.standard_normal((2, lk, 3, 8)).astype(np.float32)
    v = rng.standard_normal((2, lk, 3, 8)).astype(np.float32)
    mask = rng.random((2, 1, lq, lk)) > 0.3 if masked else None
    mask = None if mask is None else mask | (np.arange(lk) == 0)  # every query sees at least one key
    out = attention.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    t = lambda a: torch.from_numpy(a).transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(
        t(q), t(k), t(v), attn_mask=None if mask is None else torch.from_numpy(mask)
    ).transpose(1, 2)
    assert_parity(out, ref.numpy(), rel=1e-5, what=f"{implementation} attention")


def test_chunked_attention_gradients_match_unchunked():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 512, 2, 8)).astype(np.float32)) for _ in range(3))

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, implementation=impl) ** 2)

    a = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    b = jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(a, b):
        assert_parity(x, y, rel=1e-5, what="attention gradient")


def test_unknown_attention_implementation_is_a_clear_error():
    x = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention.dot_product_attention(x, x, x, implementation="flash3")
