"""Compile the fused kernel for Hopper (sm_90) on any machine with Triton — no GPU needed — and
report, per configuration, what the compiler made of it: registers and spills (cuobjdump's resource
usage), shared memory, TMA loads in the TTGIR (pipelined loops show several), wgmma ops, and
whether the tile loop was flattened. How the session-3 tail problem was found without device time.

    python benchmarks/inspect_kernels.py            # the shipped configurations (full and narrow tiles), r16 / r4 / r64 tails
    TTGIR=out python benchmarks/inspect_kernels.py  # also write each TTGIR into out/
"""

import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraplug.runtime import kernels
from loraplug.runtime import triton_kernels as tk


def compile_fused(fp8: bool, has_lora: bool, one_step: bool, tiles: kernels.Tiles, shift: bool = False):
    """The persistent TMA kernel as ``lora_linear`` would launch it (device-made descriptors; runs
    starting on the 16-byte grid, or off it as for ranks that are not multiples of 8 on slices)."""
    fn = tk._lora_linear_tma_kernel
    dt = "fp8e4nv" if fp8 else "bf16"
    signature = {"a_desc": f"*{dt}", "w_desc": f"*{dt}", "o_desc": "*bf16", "h_desc": "*bf16", "p_desc": "*bf16",
                 "bias_ptr": "*bf16", "sa_ptr": "*fp32", "sw_ptr": "*fp32", "hstart_ptr": "*i32", "rs_ptr": "*bf16"}  # fmt: skip
    signature.update({k: "i32" for k in ("M", "N", "K", "RH", "RC", "stride_am", "stride_wn", "stride_om",
                                         "stride_hm", "stride_pr")})  # fmt: skip
    constants = dict(HAS_BIAS=True, FP8=fp8, HAS_LORA=has_lora, BM=tiles.bm, BN=tiles.bn, BK=tiles.bk, BR=16,
                     GROUP_M=8, PACK_BN=kernels.config(fp8).bn, SHIFT=shift, NUM_SMS=132, FLATTEN=tiles.flatten, ONE_STEP=one_step,
                     DEVICE_DESC=True, WARP_SPEC=tiles.ws)  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    aligned = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in ("a_desc", "w_desc", "o_desc", "h_desc", "p_desc")}  # fmt: skip
    src = ASTSource(
        fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()}, attrs=aligned
    )
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 128), options={"num_warps": tiles.warps, "num_stages": tiles.stages}
    )


def report(compiled) -> dict:
    ttgir = compiled.asm["ttgir"]
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True
        ).stdout
    field = lambda name: int(m.group(1)) if (m := re.search(name + r":(\d+)", usage)) else None  # noqa: E731
    return {
        "registers": field("REG"), "stack": field("STACK"), "shared": compiled.metadata.shared,
        "tma_loads": ttgir.count("async_tma_copy_global_to_local"), "wgmma": ttgir.count("warp_group_dot "),
        "flattened": "scf.if" in ttgir.split("scf.for", 1)[-1].split("tt.return")[0],
    }  # fmt: skip


def main() -> None:
    out = os.environ.get("TTGIR")
    cases = (("no adapter", False, True, False), ("r16 (one step)", True, True, False),
             ("r4 (shifted)", True, True, True), ("r64 (loop)", True, False, False))  # fmt: skip
    for fp8 in (False, True):
        for size in ("", "_narrow"):
            tiles = kernels.Tiles(*kernels.CONFIGS[("fp8" if fp8 else "bf16") + size])
            for name, has_lora, one_step, shift in cases:
                compiled = compile_fused(fp8, has_lora, one_step, tiles, shift)
                row = report(compiled)
                label = f"{'fp8' if fp8 else 'bf16'}{size}"
                print(f"{label:11s} {name:15s} {row}", flush=True)
                if out:
                    Path(out).mkdir(exist_ok=True)
                    Path(out, f"{label}_{name.split()[0]}.ttgir").write_text(compiled.asm["ttgir"])


if __name__ == "__main__":
    main()
