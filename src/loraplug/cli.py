"""The ``loraplug`` command."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from . import api, specs
from .arch import ModelIndex
from .errors import LoraplugError
from .formats import write
from .skeleton import load_skeleton

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="LoRA-family adapters on any PyTorch model."
)
console = Console()
_state = {"debug": False}


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


def _fail(err: Exception) -> None:
    if _state["debug"]:
        raise err
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {err}", highlight=False)
    raise typer.Exit(2)


@app.command()
def demo() -> None:
    """Two diffusers-format LoRAs on a tiny fused Flux transformer, bypass vs merged, offline."""
    from .demo import run

    try:
        result = run(console)
    except (LoraplugError, ImportError) as err:
        _fail(err)
    if not result["ok"]:
        raise typer.Exit(1)


def _summary(path: Path) -> dict:
    ad = api.load(path)
    blocks: dict[str, int] = defaultdict(int)
    ranks: dict[str, int] = defaultdict(int)
    alphas: dict[str, int] = defaultdict(int)
    dtypes: set[str] = set()
    for key, adapter in ad.adapters.items():
        blocks[_block_of(key)] += 1
        ranks[str(specs.get(adapter.algorithm).rank(adapter))] += 1
        alphas[str(adapter.alpha)] += 1
        dtypes |= {str(t.dtype).replace("torch.", "") for t in adapter.tensors.values()}
    meta = {k: v for k, v in ad.metadata.items() if len(v) < 200 and k != "lora_adapter_metadata"}
    return {
        "file": str(path),
        "format": ad.format,
        "algorithms": ad.algorithms,
        "modules": len(ad),
        "parameters": ad.parameters,
        "bytes": path.stat().st_size if path.is_file() else None,
        "ranks": dict(ranks),
        "alphas": dict(alphas),
        "dtypes": sorted(dtypes),
        "blocks": dict(blocks),
        "unknown_keys": ad.unknown_keys,
        "metadata": meta,
        "trigger_words": _trigger_words(ad.metadata),
        "base_model": _base_model(ad.metadata),
    }


def _trigger_words(metadata: dict[str, str], limit: int = 8) -> list[str]:
    """Trigger words as trainers record them: modelspec.trigger_phrase, else kohya's most frequent tags."""
    if metadata.get("modelspec.trigger_phrase"):
        return [w.strip() for w in metadata["modelspec.trigger_phrase"].split(",") if w.strip()]
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    counts: dict[str, int] = defaultdict(int)
    for tags in frequencies.values() if isinstance(frequencies, dict) else []:
        for tag, n in tags.items():
            counts[tag.strip()] += int(n)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]]


def _base_model(metadata: dict[str, str]) -> str | None:
    for key in ("modelspec.architecture", "ss_base_model_version", "base_model", "ss_sd_model_name"):
        if metadata.get(key):
            return metadata[key]
    return None


def _block_of(key: str) -> str:
    parts = key.replace("_", ".").split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) == 1 else ".".join(parts[:2])


@app.command()
def inspect(
    files: Annotated[list[Path], typer.Argument(help="Adapter files or PEFT directories.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint, key list or diffusers dir: coverage.")
    ] = None,
) -> None:
    """Format, algorithms, ranks/alphas, dtypes, size, blocks and metadata of adapter files."""
    try:
        summaries = [_summary(f) for f in files]
        if model is not None:
            index = ModelIndex(load_skeleton(model))
            for s in summaries:
                plan = index.resolve(api.load(s["file"]))
                s["coverage"] = {"matched": len(plan.matched), "unmatched": plan.unmatched,
                                 "fused": sum(any(t.size is not None or t.rows for t in ts)
                                              for ts in plan.matched.values())}  # fmt: skip
    except LoraplugError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
        return
    for s in summaries:
        table = Table(title=s["file"], show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for field in ("format", "algorithms", "modules", "parameters", "bytes", "ranks", "alphas", "dtypes"):
            table.add_row(field, str(s[field]))
        if s["base_model"]:
            table.add_row("base model", s["base_model"])
        if s["trigger_words"]:
            table.add_row("trigger words", ", ".join(s["trigger_words"]))
        table.add_row(
            "blocks",
            ", ".join(f"{b}×{n}" for b, n in list(s["blocks"].items())[:12])
            + (" …" if len(s["blocks"]) > 12 else ""),
        )
        for k, v in s["metadata"].items():
            table.add_row(f"meta:{k}", v)
        if "coverage" in s:
            c = s["coverage"]
            table.add_row("coverage", f"{c['matched']} matched ({c['fused']} into fused slices), "
                          f"{len(c['unmatched'])} unmatched")  # fmt: skip
            for key, reason in list(c["unmatched"].items())[:8]:
                table.add_row("[red]unmatched[/red]", f"{key}: {reason}")
        if s["unknown_keys"]:
            table.add_row("[red]unknown keys[/red]", ", ".join(s["unknown_keys"][:8]))
        console.print(table)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="Adapter file or PEFT directory.")],
    target: Annotated[Path, typer.Argument(help="Output .safetensors file.")],
    to: Annotated[str, typer.Option("--to", help="peft, kohya or comfy.")] = "peft",
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint, key list or diffusers dir (for kohya names).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, fp16 or bf16.")] = None,
    resize_rank: Annotated[
        int | None, typer.Option("--resize-rank", help="Re-factor LoRAs to this rank (SVD).")
    ] = None,
) -> None:
    """Convert an adapter between key conventions (optionally cast or re-rank it)."""
    try:
        if dtype is not None and dtype not in DTYPES:
            raise LoraplugError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}.")
        adapters = api.load(source)
        kept: list[str] = []
        if resize_rank is not None:
            adapters, kept = write.resize(adapters, resize_rank)
        skeleton = load_skeleton(model) if model is not None else None
        out = api.save(adapters, target, format=to, model=skeleton, dtype=DTYPES.get(dtype))
    except LoraplugError as err:
        _fail(err)
    console.print(
        f"wrote [green]{out}[/green]: {len(adapters)} modules as {to}"
        + (f"; {len(kept)} not re-ranked (not plain LoRA)" if kept else "")
    )


@app.command()
def merge(
    base: Annotated[Path, typer.Argument(help="Base checkpoint (.safetensors).")],
    adapters: Annotated[list[Path], typer.Argument(help="Adapter files or PEFT directories.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Merged checkpoint to write.")],
    strength: Annotated[list[float] | None, typer.Option(help="One per adapter, or one for all.")] = None,
    strict: Annotated[bool, typer.Option(help="Refuse adapters with keys the checkpoint lacks.")] = True,
) -> None:
    """Bake adapters into a checkpoint, streamed tensor by tensor (float and fp8 with scales)."""
    from .checkpoint import merge_checkpoint

    try:
        sets = [api.load(a) for a in adapters]
        values = strength or [1.0]
        if len(values) not in (1, len(sets)):
            raise LoraplugError(
                f"{len(values)} --strength values for {len(sets)} adapters; give one, or one each."
            )
        values = values * len(sets) if len(values) == 1 else values
        if output.resolve() == base.resolve():
            raise LoraplugError(
                f"{output}: the output would overwrite the base checkpoint; choose another path."
            )
        summary = merge_checkpoint(base, sets, values, output, strict=strict)
    except LoraplugError as err:
        _fail(err)
    console.print(
        f"wrote [green]{output}[/green]: {summary.keys} adapter keys into {summary.modules} modules"
        + (f", {len(summary.requantized)} fp8 weights requantized" if summary.requantized else "")
        + (f"; [yellow]{len(summary.unmatched)} keys unmatched[/yellow]" if summary.unmatched else "")
    )


@app.command()
def bench(
    results: Annotated[Path | None, typer.Option(help="Show a saved run (JSON) instead of running.")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="Also time torch.compile variants.")] = False,
    fp8: Annotated[bool, typer.Option("--fp8", help="Also time an fp8 base (instead of PEFT).")] = False,
    blocks: Annotated[
        tuple[int, int] | None, typer.Option(help="Double and single blocks (default 19 38).")
    ] = None,
    suite: Annotated[
        str, typer.Option(help="full: the diffusers Flux transformer; linear: only its linear layers.")
    ] = "full",
) -> None:
    """The GPU benchmarks at Flux-dev size: loraplug bypass vs base, PEFT, merged, fp8."""
    import os

    if results is not None:
        from .bench import table

        try:
            data = json.loads(results.read_text())
        except (OSError, json.JSONDecodeError) as err:
            _fail(LoraplugError(f"{results}: not a benchmark result ({err})."))
        console.print(table(data))
        return
    if suite not in ("full", "linear"):
        _fail(LoraplugError(f"--suite {suite!r}: use full or linear."))
    if not torch.cuda.is_available():
        _fail(LoraplugError("loraplug bench needs a CUDA GPU; use --results FILE to show a saved run."))
    if blocks:
        os.environ["ND"], os.environ["NS"] = str(blocks[0]), str(blocks[1])
    os.environ["COMPILE"] = "1" if compile else "0"
    os.environ["FP8"] = "1" if fp8 else "0"
    from .bench import linear_stack, table
    from .bench import main as run_bench

    if suite == "linear":
        console.print(table(linear_stack()))
        return
    run_bench()
    out = Path(os.environ.get("OUT", ".")) / os.environ.get("NAME", "flux_bench.json")
    console.print(table(json.loads(out.read_text())))


if __name__ == "__main__":
    app()
