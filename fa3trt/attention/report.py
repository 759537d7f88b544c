"""What routing did with a model's attention calls: ``RoutingReport``, the counts of calls routed
(and what each needed of the op) and calls left alone, by reason. ``route_attention`` fills one
per block; a server adds them up (``/v1/info``); an export keeps its own (``ExportResult.routing``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RoutingReport"]


@dataclass
class RoutingReport:
    """Calls routed (and what they needed of the op) and calls left alone (by reason)."""

    method: str
    """The hooks used: ``"sdpa"``, ``"transformers"`` or ``"transformers+sdpa"``."""
    routed: int = 0
    routed_with: dict[str, int] = field(default_factory=dict)
    """Routed calls that needed key lengths, causal, grouped heads or Sq != Sk."""
    left: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "routed": self.routed, "routed_with": self.routed_with, "left": self.left}

    def add(self, other: RoutingReport) -> None:
        """Add ``other``'s counts to this report (a server's totals over its batches)."""
        self.routed += other.routed
        for mine, theirs in ((self.routed_with, other.routed_with), (self.left, other.left)):
            for k, n in theirs.items():
                mine[k] = mine.get(k, 0) + n

    def summary(self) -> str:
        line = f"route_attention ({self.method}): routed {self.routed} attention calls"
        if self.routed_with:
            line += " (" + ", ".join(f"{n} with {k}" for k, n in self.routed_with.items()) + ")"
        left = "; ".join(f"{n} x {k}" for k, n in self.left.items())
        return line + (f"; left {sum(self.left.values())} alone: {left}" if left else "; left none alone")
