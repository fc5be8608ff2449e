"""Integer helpers for the host side of the launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton ``constexpr_function`` objects since
Triton 3.5: called from Python each costs a few microseconds (constexpr unwrapping), and a decode
call made ~70 of them (measured on the H200 host: ~270 us of a 275 us call). These are the plain
Python versions, for host code only (kernels keep ``tl.cdiv``).
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1``; 0 for 0 (as Triton's)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


__all__ = ["cdiv", "next_power_of_2"]
