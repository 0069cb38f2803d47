"""Hadamard matrices and the fast Hadamard transform (stateless primitives).

A Hadamard matrix ``H`` of order ``n`` has entries ``±1`` and ``H H^T = n I``, so
``H / sqrt(n)`` is orthogonal. :func:`hadamard` builds one for ``n = 2^k * m`` as the
Kronecker product ``H_m (x) S_{2^k}`` of a small base matrix ``H_m`` and Sylvester's
``S_{2^k}``, where ``m`` is

* ``1``;
* ``q + 1`` with ``q`` a prime power ``≡ 3 (mod 4)`` (Paley's first construction over GF(q):
  4, 8, 12, 20, 24, 28 = 3^3 + 1, 32, 44, ..., 344 = 7^3 + 1, ...);
* ``2 (q + 1)`` with ``q`` a prime power ``≡ 1 (mod 4)`` (Paley's second construction over GF(q):
  12, 28, 36, 52 = 2 (5^2 + 1), 60, ..., 100 = 2 (7^2 + 1), ...).

Where several apply, a prime ``q`` is used before a prime power, then Paley I before Paley II
(28 is Paley II over GF(13)): a base order that primes alone gave keeps the matrix it had
before prime powers were added.
:func:`hadamard_factors` takes out the largest power of two that leaves a base order ``m``,
so the base matrix is as small as these constructions allow (``576 = 36 * 16``,
``1536 = 12 * 128``, ``4096 = 1 * 4096``, ``11008 = 344 * 32``). :func:`hadamard_transform`
applies ``x H / sqrt(n)`` along the last dimension in ``O(n log n + n m)``: a fast
Walsh-Hadamard butterfly for the ``2^k`` part and one ``(m, m)`` matmul for the rest.
QuaRot (Ashkboos et al. 2024) uses these to rotate a transformer's activations
(:mod:`torchquant.ptq.rotate`).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["hadamard", "hadamard_factors", "hadamard_transform", "random_hadamard", "random_signs"]


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k``, ``p`` prime and ``k >= 1``; ``None`` if ``q`` is no prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # the smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _digits(a: int, p: int, k: int) -> list[int]:
    """The ``k`` base-``p`` digits of ``a``, lowest first: the coefficients of a polynomial over GF(``p``)."""
    return [a // p**t % p for t in range(k)]


def _poly_mul(a: list[int], b: list[int], p: int) -> list[int]:
    """``a * b`` over GF(``p``); coefficient lists, lowest degree first."""
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] = (out[i + j] + x * y) % p
    return out


def _poly_rem(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(``p``), ``f`` monic; coefficient lists, lowest degree first."""
    a, d = list(a), len(f) - 1
    for top in range(len(a) - 1, d - 1, -1):
        c = a[top] % p
        if c:
            for t in range(d + 1):
                a[top - d + t] = (a[top - d + t] - c * f[t]) % p
    return [c % p for c in a[:d]]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree ``k`` over GF(``p``), counting the lower coefficients
    as base-``p`` digits (``x`` for ``k = 1``). Irreducible: no monic factor of degree ``1 .. k // 2``."""
    for r in range(p**k):
        f = [*_digits(r, p, k), 1]
        if all(any(_poly_rem(f, [*_digits(s, p, d), 1], p)) for d in range(1, k // 2 + 1) for s in range(p**d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # unreachable: one always exists


def _jacobsthal(q: int) -> Tensor:
    """``Q[i, j] = chi(j - i)`` over GF(q), ``chi`` the quadratic character (``chi(0) = 0``), as ``(q, q)`` int8.

    ``q = p^k``: element ``a`` is the polynomial whose coefficients are the base-``p`` digits of ``a``,
    multiplied modulo :func:`_irreducible`'s polynomial. For ``k = 1`` that is arithmetic mod ``q``.
    """
    pk = _prime_power(q)
    if pk is None:
        raise ValueError(f"{q} is not a prime power")
    p, k = pk
    f = _irreducible(p, k)
    squares: set[int] = set()
    for x in range(1, q):
        d = _digits(x, p, k)
        squares.add(sum(c * p**t for t, c in enumerate(_poly_rem(_poly_mul(d, d, p), f, p))))
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.int8)
    # j - i digit by digit (the additive group of GF(p^k) is Z_p^k); int32 halves the peak memory for large q
    a = torch.arange(q, dtype=torch.int32)
    diff = torch.zeros(q, q, dtype=torch.int32)
    for t in range(k):
        d = a // p**t % p
        diff += (d[None, :] - d[:, None]) % p * p**t
    return chi[diff]


def _paley_kind(m: int, prime_fields: bool = False) -> int:
    """1 or 2 if Paley's first (``q = m - 1 ≡ 3 mod 4``) or second (``q = m / 2 - 1 ≡ 1 mod 4``) construction
    over a field GF(q) gives order ``m``, else 0; with ``prime_fields``, over a prime field only.

    A prime ``q`` wins over a prime power (28: Paley II over GF(13), not Paley I over GF(27)), so every
    order that prime fields gave before prime powers were supported keeps its matrix.
    """
    if m < 4 or m % 4:
        return 0
    fields: list[tuple[bool, int]] = []  # (q is not prime, kind): the smallest is used
    for kind, q, residue in ((1, m - 1, 3), (2, m // 2 - 1, 1)):
        pk = _prime_power(q) if q % 4 == residue else None
        if pk is not None and not (prime_fields and pk[1] > 1):
            fields.append((pk[1] > 1, kind))
    return min(fields)[1] if fields else 0


def _check_base_order(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``n = m * 2^k`` with a base matrix of order ``m``."""
    p = n // m if isinstance(m, int) and not isinstance(m, bool) and m >= 1 and n % m == 0 else 0
    if p < 1 or p & (p - 1) or not (m == 1 or _paley_kind(m)):
        raise ValueError(f"torchquant.hadamard: {m!r} is no base order of {n}: n must be m * 2^k with m a base order")


@functools.cache
def _base(m: int) -> Tensor:
    """The base matrix of order ``m`` (1 or a Paley order) as ``(m, m)`` int8 ±1 on the CPU (cached: do not
    modify it)."""
    with torch.device("cpu"):  # whatever the default device: the cache outlives it
        return _build_base(m)


def _build_base(m: int) -> Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int8)
    kind = _paley_kind(m)
    if kind == 1:
        q = m - 1
        # H = I + [[0, 1^T], [-1, Q]]: Q is antisymmetric for q ≡ 3 (mod 4), which makes H H^T = m I
        S = torch.zeros(m, m, dtype=torch.int8)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
        return S + torch.eye(m, dtype=torch.int8)
    q = m // 2 - 1
    # Symmetric conference matrix C = [[0, 1^T], [1, Q]] (zero only on its diagonal); each entry c becomes
    # the 2x2 block c * [[1, 1], [1, -1]], or [[1, -1], [-1, -1]] where c = 0
    C = torch.ones(q + 1, q + 1, dtype=torch.int8)
    C[0, 0], C[1:, 1:] = 0, _jacobsthal(q)
    one, zero = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8), torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    return torch.kron(C, one) + torch.kron(torch.eye(q + 1, dtype=torch.int8), zero)


def hadamard_factors(n: int, *, prime_fields: bool = False) -> tuple[int, int]:
    """``(m, p)`` with ``n = m * p``: ``p`` the largest power of two whose cofactor ``m`` has a base matrix.

    That is not always the largest power of two dividing ``n``: ``11008 = 43 * 256`` has no base of
    order 43, 86 or 172, so it is ``344 * 32`` (Paley I over GF(7^3)). With ``prime_fields=True``,
    only bases over prime fields count (the factorisation before prime powers were supported, which
    QuaRot checkpoints that do not record theirs were rotated with: ``11008 = 5504 * 2``).

    Raises:
        ValueError: no construction here gives order ``n``.

    Example:
        >>> hadamard_factors(576), hadamard_factors(1536), hadamard_factors(64), hadamard_factors(11008)
        ((36, 16), (12, 128), (1, 64), (344, 32))
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"torchquant.hadamard: the order must be a positive int, got {n!r}")
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1 or _paley_kind(m, prime_fields):
            return m, p
        p //= 2
    raise ValueError(
        f"torchquant.hadamard: no Hadamard matrix of order {n}: it must be 2^k * m with m = 1, m - 1 a prime power "
        "≡ 3 (mod 4) (Paley I) or m / 2 - 1 a prime power ≡ 1 (mod 4) (Paley II); e.g. 12, 20, 36, 52, 64, 576, "
        "1536, 11008"
    )


def _sylvester(p: int, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(
    n: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    base_order: int | None = None,
) -> Tensor:
    """A Hadamard matrix of order ``n``: ``(n, n)``, entries ``±1``, ``H H^T = n I``.

    ``H = H_m (x) S_p`` with ``(m, p) = hadamard_factors(n)`` (see the module docstring), or
    ``m = base_order`` when given.

    Args:
        n: the order.
        dtype: the result's dtype.
        device: the result's device.
        base_order: the order ``m`` of the base matrix (``n / m`` a power of two), for another
            factorisation than :func:`hadamard_factors`' (a checkpoint's).

    Raises:
        ValueError: no construction here gives order ``n`` (e.g. 6), or ``base_order`` does not fit.

    Example:
        >>> H = hadamard(12)
        >>> torch.equal(H @ H.T, 12 * torch.eye(12))
        True
    """
    if base_order is None:
        m, p = hadamard_factors(n)
    else:
        _check_base_order(n, base_order)
        m, p = base_order, n // base_order
    base = _base(m).to(dtype=dtype, device=torch.get_default_device() if device is None else device)
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
    base factor of order ``m`` as one ``(N p, m) @ (m, m)`` matmul. No data-dependent control
    flow: with ``n`` given it traces with torch.fx, and it compiles and exports to ONNX
    (reshapes, adds, a matmul).

    Args:
        x: ``(..., n)``.
        base: the ``(m, m)`` base matrix (``hadamard(m)``, ``(m, p) = hadamard_factors(n)``)
            when the caller holds it (a module's buffer), or one of another base order
            (``hadamard(m, base_order=m)``); built here otherwise.
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
    if base is None:
        m, p = hadamard_factors(n)
    else:  # the caller's factorisation (a checkpoint's, say)
        m = base.shape[0]
        p = n // m
    # Index i = a * p + b, (a, b) = (base row, Sylvester row). With the base axis last, the base factor is one
    # (N p, m) @ (m, m) GEMM instead of N small ones (~75x faster for a base of order 5504), and the butterfly
    # adds runs of m contiguous elements (on a CPU ~1.5x faster than runs of h = 1, 2, ... for 576, 1536, 14336).
    # The transpose is a view: the first butterfly step's stack pays for it.
    y = x.reshape(-1, m, p).transpose(1, 2)  # (N, p, m)
    h = 1
    while h < p:
        y = y.reshape(-1, p // (2 * h), 2, h, m)  # the size-2 axis is one bit of b
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(-1, m)
    if m > 1:
        if base is None:
            base = hadamard(m, dtype=x.dtype, device=x.device)
        y = torch.matmul(y, base.to(x.dtype))  # sum_a y[N, b, a] H_m[a, c]
    y = y * (1.0 / math.sqrt(n))
    return y.reshape(-1, p, m).transpose(1, 2).reshape(x.shape)
