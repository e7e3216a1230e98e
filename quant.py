"""
Quantized decoding on the CPU: every Linear of a trained model, the head included, swapped for an int8 or an
int4 one (python sample.py / serve.py / eval.py --quantize=int8|int4). For inference only: a quantized model
cannot train or be saved.

int8: symmetric per-output-channel weights through PyTorch's dynamic-quantized linear (fbgemm's kernels):
each call quantizes its activations (per tensor, 7 bits on x86: reduce_range, which fbgemm's 16-bit
accumulation needs; 8 bits lost ~10x the accuracy in a probe), multiplies in int8 and returns float32.
int4: asymmetric weights per group of 32 inputs (scale and zero as gpt-fast stores them, in bfloat16), packed
for _weight_int4pack_mm_for_cpu, which dequantizes inside its matmul; activations go in as bfloat16.
Two kernels that look right and are not, measured on this 2-core CPU: _weight_int8pack_mm with float
activations ran 4x slower than float32, and gpt-fast's compiled dequantize-then-matmul 12x slower.
Batch-1 decoding of a small model is bound by the cost of each op call, not by the matmuls: compiling the
one-token step (sample.py --compile=True, model.compile_decoding) makes 6L x 384 int8 1.3-1.5x faster (bench.py decode).

    from quant import quantize
    model = quantize(model, "int8")    # in place; returns the model
"""
import itertools
import warnings
import weakref

import torch
import torch.nn as nn

from common import die

MODES = ("int8", "int4")
GROUP = 32  # int4: inputs per scale and zero

# torch.compile cannot trace fbgemm's packed weights (a TorchScript object): a graph break at every Linear made
# compiled decoding slower than eager. Under compile an int8 Linear calls this op instead, which names its
# QuantLinear by a number, so that the whole decode step is one graph around 25 opaque calls.
_INT8, _KEYS = weakref.WeakValueDictionary(), itertools.count()  # key -> QuantLinear (int8)
_LIB = torch.library.Library("nanollm", "DEF")
_LIB.define("int8_linear(Tensor x, int key, int out_features) -> Tensor")
_LIB.impl("int8_linear", lambda x, key, n: torch.ops.quantized.linear_dynamic.default(x, _INT8[key].packed, True), "CPU")
_LIB.impl("int8_linear", lambda x, key, n: x.new_empty(*x.shape[:-1], n), "Meta")  # shapes, for the compiler


def int8_scales(w):
    """int8's symmetric per-output-channel step of a weight (out, in): the row's largest magnitude maps to 127."""
    return (w.abs().amax(1) / 127).clamp(min=1e-12)


class QuantLinear(nn.Module):
    """A Linear's weights quantized (mode 'int8' or 'int4'); forward takes and returns float32."""

    def __init__(self, linear, mode):
        super().__init__()
        w = linear.weight.detach().float().cpu()
        self.mode, self.in_features, self.out_features = mode, w.size(1), w.size(0)
        self.bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        # generate() asks the head for its device and dtype: an empty float32 tensor tells them
        self.register_buffer("weight", torch.empty(0), persistent=False)
        if mode == "int8":
            scale = int8_scales(w)
            with warnings.catch_warnings():  # (quantized tensors are deprecated; the packed kernel is the point)
                warnings.simplefilter("ignore")
                qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qw, self.bias)
            self.key = next(_KEYS)
            _INT8[self.key] = self
            return
        n = -(-self.out_features // 16) * 16  # the packing wants whole tiles of 16 rows: zero rows pad it
        w = torch.cat([w, w.new_zeros(n - len(w), w.size(1))]).view(n, -1, GROUP)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = ((w - lo) / scale).round().clamp(0, 15).to(torch.int32).view(n, -1)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # the kernel computes (q - 8) * scale + zero: so zero = lo + 8 * scale; (groups, out, 2)
        self.scales_zeros = torch.stack([scale[..., 0], (lo + 8 * scale)[..., 0]], -1).transpose(0, 1).contiguous().bfloat16()

    def forward(self, x):
        if self.mode == "int8":
            # fbgemm takes any leading dims: a reshape and view around it cost ~10% of 6L x 384 batch-1 decoding
            # (a token is ~25 calls of ~30 us each)
            if torch.compiler.is_compiling():
                return torch.ops.nanollm.int8_linear(x.float(), self.key, self.out_features)
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True)
        # int4: bfloat16 activations (the kernel's float32 path is a slow fallback, 12x slower here)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).bfloat16(), self.packed,
                                                        GROUP, self.scales_zeros)
        y = y[:, :self.out_features].float()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize(model, mode):
    """Every nn.Linear of model (on the CPU) replaced by a QuantLinear of mode; in place, returns model. An int4
    Linear whose inputs do not split into groups of 32 stays float32 (said once)."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")
    kept = []
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if mode == "int4" and child.in_features % GROUP:
                    kept.append(f"{name}.{child_name}".lstrip("."))
                    continue
                setattr(parent, child_name, QuantLinear(child, mode))
    if kept:
        print(f"note: {len(kept)} Linear(s) stay float32 (int4 needs inputs in groups of {GROUP}): {kept[:3]}")
    model.quantized = mode
    return model.eval().requires_grad_(False)


def check_mode(mode):
    """--quantize's value, checked before any model loads."""
    if mode and mode not in MODES:
        die(f"quantize must be int8 or int4 (or '' for float32), got {mode!r}")


def for_decoding(model, mode, device):
    """--quantize of sample.py, serve.py and eval.py: '' leaves the model as it is."""
    check_mode(mode)
    if not mode:
        return model
    if device != "cpu":
        die(f"--quantize={mode} runs PyTorch's CPU kernels, and this run is on {device}: add --device=cpu")
    return quantize(model, mode)
