"""The contract every backend fulfils, and the registry the dispatcher reads.

A backend computes attention on the *internal layout*:

* dense calls: q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hk, D)``, ``cu_seqlens_* = None``;
* varlen calls: q ``(1, total_q, H, D)``, k/v ``(1, total_k, Hk, D)`` with int32
  ``cu_seqlens_q`` / ``cu_seqlens_k`` of shape ``(nseq + 1,)`` and ``max_seqlen_*``.

``forward`` returns ``(out, lse)``: out like q, lse float32 ``(B, H, Sq)`` (varlen:
``(1, H, total_q)``), ``-inf`` on rows that see no key (their out is 0).
``backward`` recomputes from ``(q, k, v, out, lse, dout)`` and returns ``(dq, dk, dv)`` shaped
and typed like ``(q, k, v)``. ``alibi_slopes`` is None or fp32 ``(nseq_or_batch, H)``
contiguous; ``seed`` is the dropout seed (used only when ``spec.dropout_p > 0``; the keep
mask is :func:`flashtile.rng.keep_mask`). All option semantics are in :mod:`flashtile.spec`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..spec import AttnSpec, Problem


class Backend(Protocol):
    name: str

    def available(self) -> str | None:
        """None if the backend can run in this process, else the reason it cannot."""

    def supports(self, problem: Problem, spec: AttnSpec) -> str | None:
        """None if the backend serves this call, else the reason it does not."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        spec: AttnSpec,
        *,
        cu_seqlens_q: torch.Tensor | None,
        cu_seqlens_k: torch.Tensor | None,
        max_seqlen_q: int,
        max_seqlen_k: int,
        alibi_slopes: torch.Tensor | None,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        spec: AttnSpec,
        *,
        cu_seqlens_q: torch.Tensor | None,
        cu_seqlens_k: torch.Tensor | None,
        max_seqlen_q: int,
        max_seqlen_k: int,
        alibi_slopes: torch.Tensor | None,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend to the registry (later registrations take precedence in ``auto``)."""
    _REGISTRY[backend.name] = backend
    return backend


def registry() -> dict[str, Backend]:
    return _REGISTRY
