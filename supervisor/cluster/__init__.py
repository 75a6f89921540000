"""Scale-out: several daemons on one PostgreSQL, each fire run exactly once.

``base`` holds the seams (``FireClaims``, ``NodeRegistry``, ``Claim``, the takeover policy);
``claims`` and ``nodes`` implement them in PostgreSQL, ``memory`` as test doubles, and
``lease`` keeps a claim's lease while its run goes on. Only ``base`` is imported here, so a
node without the ``postgres`` extra can still import this package.
"""

from __future__ import annotations

from supervisor.cluster.base import (
    Claim,
    ClaimStatus,
    FireClaims,
    NodeInfo,
    NodeNameInUse,
    NodeRegistry,
    TakeoverPolicy,
    claim_delay,
    config_hash,
)

__all__ = [
    "Claim",
    "ClaimStatus",
    "FireClaims",
    "NodeInfo",
    "NodeNameInUse",
    "NodeRegistry",
    "TakeoverPolicy",
    "claim_delay",
    "config_hash",
]
