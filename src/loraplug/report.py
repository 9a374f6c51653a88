"""What an apply did: every logical key matched (to which module slices) or reported."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from .arch import Target


@dataclass
class Report:
    """Coverage of one apply call.

    matched: logical key -> targets; unmatched: logical or file key -> reason; fused: keys that
    landed in a slice of a fused module; modules: module names touched; parameters: adapter
    parameters bound; other_components: keys for another pipeline component (a text encoder)
    that this model is not: not applied, not an error; apply the file to that component too;
    dequantized: quantized modules whose weight an adapter reads (DoRA, OFT…), dequantized once and
    cached beside the quantized weight.
    """

    matched: dict[str, list[Target]] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)
    other_components: dict[str, str] = field(default_factory=dict)
    modules: set[str] = field(default_factory=set)
    dequantized: set[str] = field(default_factory=set)
    parameters: int = 0

    @property
    def fused(self) -> dict[str, list[Target]]:
        return {k: ts for k, ts in self.matched.items() if any(t.size is not None for t in ts)}

    @property
    def ok(self) -> bool:
        return not self.unmatched

    def table(self, limit: int = 20) -> Table:
        """A rich table: a summary row, then up to ``limit`` unmatched keys with reasons."""
        t = Table(title="loraplug coverage", show_lines=False)
        t.add_column("what")
        t.add_column("count / key", overflow="fold")
        t.add_column("detail", overflow="fold")
        t.add_row("matched keys", str(len(self.matched)), "")
        t.add_row("  into fused slices", str(len(self.fused)), _example(self.fused))
        t.add_row("modules touched", str(len(self.modules)), "")
        t.add_row("adapter parameters", f"{self.parameters:,}", "")
        if self.dequantized:
            t.add_row(
                "quantized weights read in float", str(len(self.dequantized)), "dequantized once, cached"
            )
        if self.other_components:
            names = sorted(set(self.other_components.values()))
            t.add_row(
                "for other components", str(len(self.other_components)), f"apply to: {', '.join(names)}"
            )
        t.add_row("unmatched keys", str(len(self.unmatched)), "" if self.ok else "[red]not applied[/red]")
        for key, reason in list(self.unmatched.items())[:limit]:
            t.add_row("", key, reason)
        return t

    def __str__(self) -> str:
        console = Console(width=120, record=True, file=_Null())
        console.print(self.table())
        return console.export_text()


def _example(fused: dict[str, list[Target]]) -> str:
    if not fused:
        return ""
    key, targets = next(iter(fused.items()))
    return f"e.g. {key} -> {targets[0]}"


class _Null:
    def write(self, _):
        return 0

    def flush(self):
        pass
