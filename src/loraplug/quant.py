"""What loraplug supports on each quantized weight type (the same table as the README).

Bypass runs the base layer in its own (quantized) kernel and the adapter beside it in float, so it
works on every backend; adapter tensors are never cast to int8/uint8/fp8. Adapters that read the
base weight (DoRA, OFT/BOFT bypass needs only the output, GLoRA/PEFT-OFT/input-axis (IA)^3 run the
layer itself) get a dequantized copy, made once and cached; ``handle.report.dequantized`` lists
them. Merge mode dequantizes, adds and requantizes in the same scheme, and ``remove()`` puts the
original tensors back (the very same objects); where requantizing is not possible it refuses with
an error naming the module and suggesting bypass.

| backend | bypass | reads W (DoRA) | merge |
|---|---|---|---|
| float (fp32/fp16/bf16) | yes | yes | in place, exact restore |
| torchao Int8 / Float8 weight-only, Int8 and Float8 dynamic activation | yes | dequantized once | requantized (same granularity and activation scheme) |
| optimum-quanto qint8 / qfloat8 | yes | dequantized once | requantized (same qtype and axis) |
| optimum-quanto qint4 | yes | dequantized once | refused: use bypass |
| GGUF (diffusers ``GGUFParameter``: Q8_0, Q4_0, …) | yes | dequantized once | requantized with ``gguf`` (same type) |
| fp8 per-row + ``weight_scale`` (``loraplug.Fp8Linear``, fp8 compute) | yes (fused kernels on CUDA) | weight × row scale | requantized per row |
| fp8 + ``scale_weight`` (ComfyUI "scaled fp8") | yes | weight × scale | requantized with a new scale |
| plain fp8 | yes | upcast | requantized, saturating at the format's range |
| bitsandbytes Linear8bitLt, Linear4bit (nf4, fp4) | yes (GPU) | dequantized once | refused: use bypass |
"""

from .runtime.quant import BACKENDS, Backend, backend_of, float_weight, is_float_weight

__all__ = ["BACKENDS", "Backend", "backend_of", "float_weight", "is_float_weight"]
