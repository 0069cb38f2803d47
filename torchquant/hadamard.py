"""Hadamard matrices and the fast Hadamard transform (stateless primitives).

A Hadamard matrix ``H`` of order ``n`` has entries ``±1`` and ``H H^T = n I``, so
``H / sqrt(n)`` is orthogonal. :func:`hadamard` builds one for ``n = 2^k * m`` as the
Kronecker product ``H_m (x) S_{2^k}`` of a small base matrix ``H_m`` and Sylvester's
``S_{2^k}``, where ``m`` is

* ``1``;
* ``q + 1`` with ``q`` a prime ``≡ 3 (mod 4)`` (Paley's first construction: 4, 8, 12, 20, 24, 32, 44, ...);
* ``2 (q + 1)`` with ``q`` a prime ``≡ 1 (mod 4)`` (Paley's second construction: 12, 28, 36, 60, ...).

The largest power of two is taken out first, so the base matrix is as small as possible
(``576 = 16 * 36``, ``1536 = 128 * 12``, ``4096 = 4096 * 1``). :func:`hadamard_transform`
applies ``x H / sqrt(n)`` along the last dimension in ``O(n log n + n m)``: a fast
Walsh-Hadamard butterfly for the ``2^k`` part and an ``(m, m)`` matmul for the rest.
QuaRot (Ashkboos et al. 2024) uses these to rotate a transformer's activations
(:mod:`torchquant.ptq.rotate`).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["hadamard", "hadamard_factors", "hadamard_transform", "random_hadamard", "random_signs"]


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> list[list[int]]:
    """``Q[i][j] = chi(j - i)`` over GF(q), ``chi`` the quadratic character (``chi(0) = 0``)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    return [[chi[(j - i) % q] for j in range(q)] for i in range(q)]


def _paley_kind(m: int) -> int:
    """1 or 2 if Paley's first or second construction gives order ``m``, else 0."""
    if m >= 4 and m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1
    if m >= 4 and m % 4 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2
    return 0


@functools.cache
def _base(m: int) -> tuple[tuple[int, ...], ...]:
    """The base matrix of order ``m`` (1 or a Paley order) as nested tuples of ±1."""
    if m == 1:
        return ((1,),)
    kind = _paley_kind(m)
    if kind == 1:
        q = m - 1
        Q = _jacobsthal(q)
        # H = I + [[0, 1^T], [-1, Q]]: Q is antisymmetric for q ≡ 3 (mod 4), which makes H H^T = m I
        S = [[0] + [1] * q] + [[-1] + Q[i] for i in range(q)]
        return tuple(tuple(S[i][j] + (i == j) for j in range(m)) for i in range(m))
    q = m // 2 - 1
    Q = _jacobsthal(q)
    # Symmetric conference matrix C = [[0, 1^T], [1, Q]]; each entry becomes a 2x2 block
    C = [[0] + [1] * q] + [[1] + Q[i] for i in range(q)]
    zero, one = ((1, -1), (-1, -1)), ((1, 1), (1, -1))
    rows = []
    for i in range(q + 1):
        for r in range(2):
            row = []
            for j in range(q + 1):
                c = C[i][j]
                row += list(zero[r]) if c == 0 else [c * v for v in one[r]]
            rows.append(tuple(row))
    return tuple(rows)


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, p)``, ``n = m * p``: ``p`` the largest power of two for which :func:`hadamard` has a base of order ``m``.

    Raises:
        ValueError: no construction here gives order ``n``.

    Example:
        >>> hadamard_factors(576), hadamard_factors(1536), hadamard_factors(64)
        ((36, 16), (12, 128), (1, 64))
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"torchquant.hadamard: the order must be a positive int, got {n!r}")
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1 or _paley_kind(m):
            return m, p
        p //= 2
    raise ValueError(
        f"torchquant.hadamard: no Hadamard matrix of order {n}: it must be 2^k * m with m = 1, m - 1 a prime "
        "≡ 3 (mod 4) (Paley I) or m / 2 - 1 a prime ≡ 1 (mod 4) (Paley II); e.g. 12, 20, 36, 64, 576, 1536"
    )


def _sylvester(p: int, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """A Hadamard matrix of order ``n``: ``(n, n)``, entries ``±1``, ``H H^T = n I``.

    ``H = H_m (x) S_p`` with ``(m, p) = hadamard_factors(n)`` (see the module docstring).

    Args:
        n: the order.
        dtype: the result's dtype.
        device: the result's device.

    Raises:
        ValueError: no construction here gives order ``n`` (e.g. 6).

    Example:
        >>> H = hadamard(12)
        >>> torch.equal(H @ H.T, 12 * torch.eye(12))
        True
    """
    m, p = hadamard_factors(n)
    base = torch.tensor(_base(m), dtype=dtype, device=device)
    return torch.kron(base, _sylvester(p, dtype, device))


def random_signs(n: int, seed: int = 0) -> Tensor:
    """``(n,)`` float64 random ``±1`` from a CPU generator seeded with ``seed`` (:func:`random_hadamard`'s signs).

    Example:
        >>> random_signs(4, seed=0).abs().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_hadamard(
    n: int, seed: int = 0, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """A random orthogonal Hadamard matrix ``H diag(s) / sqrt(n)``, ``s`` random signs drawn from ``seed``.

    Args:
        n: the order.
        seed: seeds the signs (a CPU generator, so the matrix is the same on every device).
        dtype: the result's dtype (float64 by default: it is meant for rotating weights).
        device: the result's device.

    Returns:
        ``(n, n)`` orthogonal matrix.

    Example:
        >>> Q = random_hadamard(12, seed=3)
        >>> torch.allclose(Q @ Q.T, torch.eye(12, dtype=torch.float64))
        True
    """
    H = hadamard(n, dtype=torch.float64) * random_signs(n, seed)[None, :] / math.sqrt(n)
    return H.to(dtype=dtype, device=device)


def hadamard_transform(x: Tensor, base: Tensor | None = None, *, n: int | None = None) -> Tensor:
    """``x @ hadamard(n) / sqrt(n)`` along the last dimension (``n = x.shape[-1]``), an orthogonal transform.

    The ``2^k`` factor runs as a Walsh-Hadamard butterfly (``k`` add/subtract steps), the
    base factor of order ``m`` as one ``(m, m)`` matmul. No data-dependent control flow:
    with ``n`` given it traces with torch.fx, and it compiles and exports to ONNX
    (reshapes, adds, a matmul).

    Args:
        x: ``(..., n)``.
        base: the ``(m, m)`` base matrix (``hadamard(m)``, ``(m, p) = hadamard_factors(n)``)
            when the caller holds it (a module's buffer); built here otherwise.
        n: the size of the last dimension when the caller knows it (torch.fx tracing);
            read from ``x`` otherwise.

    Returns:
        ``(..., n)``, the dtype of ``x``.

    Example:
        >>> x = torch.randn(3, 576)
        >>> torch.allclose(hadamard_transform(x), x @ hadamard(576) / 24, atol=1e-5)
        True
    """
    n = x.shape[-1] if n is None else n
    m, p = hadamard_factors(n)
    y = x.reshape(-1, m, p)  # index i = a * p + b: (a, b) = (base row, Sylvester row)
    h = 1
    while h < p:
        y = y.reshape(-1, m, p // (2 * h), 2, h)  # the size-2 axis is one bit of b
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:
        if base is None:
            base = hadamard(m, dtype=x.dtype, device=x.device)
        y = torch.matmul(base.to(x.dtype).t(), y)  # (m, m) @ (N, m, p): sum_a H_m[a, c] y[N, a, b]
    return y.reshape(x.shape) * (1.0 / math.sqrt(n))
