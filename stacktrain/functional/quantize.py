"""Low-precision gradients: k-bit symmetric quantizers, INT4 packing, backward hooks that quantize a
model's weight and activation gradients, and a DDP communication hook that sends k-bit gradients.

No Lightning here. The quantizer follows "Training Transformers with 4-bit Integers" (Xi et al.,
NeurIPS 2023): a symmetric max-abs scale, one per tensor (weight gradients) or one per row
(activation gradients), codes clamped to the signed k-bit range ``[-(2^(k-1)-1), 2^(k-1)-1]`` (+-7 at
4 bits), and stochastic rounding, which keeps the quantized gradient unbiased. Non-finite values
(inf, NaN) are left out of the scale and passed through unchanged, so AMP's grad scaler still sees
them and skips the step.

    model = MyNet()
    quantizer = GradientQuantizer(bits=4, targets="both").attach(model)
    loss_fn(model(x)).backward()       # every weight / activation gradient went through 4 bits
    quantizer.detach()
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from stacktrain.errors import StackError, require_choice, require_number

__all__ = [
    "TARGETS",
    "QuantizedTensor",
    "max_code",
    "quantize",
    "dequantize",
    "fake_quantize",
    "relative_error",
    "pack_int4",
    "unpack_int4",
    "pack_codes",
    "unpack_codes",
    "payload_bytes",
    "ACTIVATION_LAYERS",
    "GradientQuantizer",
    "CompressedCommState",
    "quantized_allgather_hook",
    "mix_seed",
]

#: What the backward quantizer acts on: parameter gradients, activation gradients, or both.
TARGETS = ("weights", "activations", "both")

#: Layers whose output gradient ("activation gradient") is quantized: the inputs of the two backward
#: matrix products (weight gradient and input gradient) of every linear and convolution.
ACTIVATION_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class QuantizedTensor(NamedTuple):
    """Integer codes (int8, values in the signed k-bit range) and the float32 scale(s) that map them
    back: ``value = codes * scale``. ``scale`` broadcasts against ``codes``."""

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int


def check_bits(bits: Any, key: str = "bits", source: str = "quantize") -> int:
    """``bits`` if it is an integer in 2..8, else `StackError` (1 bit has no symmetric code besides 0)."""
    return require_number(bits, key, source=source, low=2, high=8, integer=True,
                          fix="use an integer number of bits from 2 to 8 (4 and 8 are the usual choices)")


def max_code(bits: int) -> int:
    """Largest code of the symmetric signed k-bit range: 7 at 4 bits, 127 at 8 bits."""
    return 2 ** (int(bits) - 1) - 1


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)


def quantize(
    x: torch.Tensor,
    bits: int,
    *,
    per_row: bool = False,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Symmetric k-bit quantization of ``x`` with a max-abs scale.

    Args:
        x: any floating tensor; computed in float32.
        bits: 2..8.
        per_row: one scale per row of ``x`` viewed as ``[x.shape[0], -1]`` (activation gradients:
            flatten the tensor so that a row is a token or a sample first); else one per tensor.
        stochastic: stochastic rounding ``floor(x / scale + U[0, 1))``, which is rounding to nearest
            after adding ``U(-0.5, 0.5)`` and is unbiased: ``E[dequantize(quantize(x))] = x``.
            Otherwise round to nearest.
        generator: the source of the rounding noise (pass one to make it reproducible).

    Non-finite entries do not enter the scale and get code 0; `fake_quantize` puts them back.
    """
    bits = int(bits)
    top = max_code(bits)
    values = x.detach().float()
    finite = torch.isfinite(values)
    clean = torch.where(finite, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if per_row:
        absmax = _rows(clean).abs().amax(dim=1)
        shape = (-1,) + (1,) * (max(values.ndim, 1) - 1)
        absmax = absmax.reshape(shape)
    else:
        absmax = clean.abs().amax()
    scale = torch.where(absmax > 0, absmax / top, torch.ones_like(absmax))
    scaled = clean / scale
    if stochastic:
        noise = torch.rand(scaled.shape, generator=generator, device=scaled.device, dtype=scaled.dtype)
        codes = torch.floor(scaled + noise)
    else:
        codes = torch.round(scaled)
    codes = codes.clamp_(-top, top).to(torch.int8)
    return QuantizedTensor(codes, scale, bits)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale`` in ``dtype``."""
    return (q.codes.float() * q.scale).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    *,
    per_row: bool = False,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype and shape, with inf and NaN passed through.

    Same numbers as `quantize` + `dequantize` (the same noise draws), computed in place in one
    float32 buffer when every value is finite (one host synchronisation to decide), which is the
    case at every step that is not going to be skipped."""
    values = x.detach().float()
    absmax = (_rows(values).abs().amax(dim=1).reshape((-1,) + (1,) * (max(values.ndim, 1) - 1))
              if per_row else values.abs().amax())
    if not bool(torch.isfinite(absmax).all()):
        q = quantize(values, bits, per_row=per_row, stochastic=stochastic, generator=generator)
        out = torch.where(torch.isfinite(values), dequantize(q, torch.float32), values)
        return out.to(x.dtype)
    top = max_code(bits)
    scale = torch.where(absmax > 0, absmax / top, torch.ones_like(absmax))
    out = values / scale
    if stochastic:
        out.add_(torch.rand(out.shape, generator=generator, device=out.device, dtype=out.dtype)).floor_()
    else:
        out.round_()
    out.clamp_(-top, top).mul_(scale)
    return out.to(x.dtype)


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> torch.Tensor:
    """``||approximation - reference|| / ||reference||`` over the finite entries (0 for a zero tensor),
    as a float32 tensor (no host synchronisation)."""
    reference = reference.detach().float()
    finite = torch.isfinite(reference)
    zero = torch.zeros((), device=reference.device)
    diff = torch.where(finite, approximation.detach().float() - reference, zero)
    norm = torch.linalg.vector_norm(torch.where(finite, reference, zero))
    return torch.where(norm > 0, torch.linalg.vector_norm(diff) / norm.clamp_min(1e-30), zero)


# --------------------------------------------------------------------------------------------- packing
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per byte (low nibble first); an odd count gets a zero pad nibble.
    ``codes`` must lie in [-8, 7]. Works on the codes' two's-complement bytes (no wider copies)."""
    flat = codes.reshape(-1).to(torch.int8).view(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] & 0xF) | (pairs[:, 1] << 4)  # uint8 shifts drop the high nibble's sign bits


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_int4`: ``numel`` int8 codes from the bytes (last dimension) of ``packed``.
    A leading batch shape (one row per rank) is kept. Sign extension by arithmetic shifts of int8."""
    low = (packed << 4).view(torch.int8) >> 4
    high = packed.view(torch.int8) >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)[..., :numel]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The bytes to send: two codes per byte at 4 bits or fewer, one byte per code above."""
    if bits <= 4:
        return pack_int4(codes)
    return codes.reshape(-1).view(torch.uint8)


def unpack_codes(payload: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits <= 4:
        return unpack_int4(payload, numel)
    return payload[..., :numel].view(torch.int8)


def payload_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` packed codes (`pack_codes`)."""
    return math.ceil(numel / 2) if bits <= 4 else numel


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, epoch, batch...), the same on every machine: the keys of
    the rounding noise. The project's seed mixer is `stacktrain.functional.seeding.mix_seed`; this hash
    stays for the quantizers so their noise, and the published grad_quant figures, are unchanged."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 % (2**64)
        value ^= value >> 29
    return value % (2**63 - 1)


class _Generators:
    """One generator per device, re-seeded together (stochastic rounding on CPU and on CUDA)."""

    def __init__(self) -> None:
        self.seed = 0
        self.by_device: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        for generator in self.by_device.values():
            generator.manual_seed(self.seed)

    def for_parameter(self, device: torch.device, index: int) -> torch.Generator:
        """A generator for one parameter, seeded from this stream's seed and the parameter's index:
        the same noise whatever else is quantized in the same call."""
        generator = self.get(device)
        generator.manual_seed(mix_seed(self.seed, index))
        return generator

    def get(self, device: torch.device) -> torch.Generator:
        generator = self.by_device.get(device)
        if generator is None:
            generator = self.by_device[device] = torch.Generator(device=device)
            generator.manual_seed(self.seed)
        return generator


# --------------------------------------------------------------------------------------------- hooks
class GradientQuantizer:
    """Quantizes a model's backward pass with hooks.

    * ``weights``: a hook on every trainable parameter quantizes its gradient (one scale per tensor)
      each time a backward reaches it, before it is accumulated into ``.grad``: with gradient
      accumulation ``.grad`` sums the dequantized gradients of the micro-batches, and DDP all-reduces
      the quantized gradient.
    * ``activations``: a hook on the output of every `ACTIVATION_LAYERS` module quantizes the gradient
      flowing into that layer's backward (one scale per row: per token for linears, per sample for
      convolutions), so both of its backward products take k-bit input.
    * ``error_feedback``: the weight-gradient quantization residual is added to the next gradient of
      the same parameter (Seide et al. 2014; Karimireddy et al. 2019). Residuals are kept in
      unscaled units (`loss_scale`), and a step can be rolled back (`rollback`) so that a step that
      AMP skips leaves them as they were.

    Randomness comes from this object's own generators, re-seeded by `reseed` (for example once per
    micro-batch from the global step and the rank), so runs are reproducible and resumable.

    Frozen parameters (``requires_grad=False``) are ignored.
    """

    def __init__(
        self,
        bits: int,
        targets: str = "both",
        *,
        stochastic: bool = True,
        error_feedback: bool = False,
        track_error: bool = True,
    ) -> None:
        self.bits = check_bits(bits, source=type(self).__name__)
        self.targets = require_choice(targets, "targets", TARGETS, source=type(self).__name__)
        if error_feedback and self.targets == "activations":
            raise StackError(
                "needs weight-gradient quantization (residuals are kept per parameter)",
                source=type(self).__name__, key="targets", value=targets,
                fix="use targets 'weights' or 'both' with error feedback",
            )
        self.stochastic = bool(stochastic)
        self.error_feedback = bool(error_feedback)
        self.track_error = bool(track_error)
        #: multiply residuals by this before adding them to a (loss-scaled) gradient; set it to the
        #: AMP grad scaler's scale before each backward
        self.loss_scale = 1.0
        self.residuals: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self.generators = _Generators()
        self.handles: list[Any] = []
        self.parameters: dict[str, nn.Parameter] = {}
        self.layers: list[str] = []
        self.reset_statistics()

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: nn.Module) -> GradientQuantizer:
        """Register the hooks on ``model``'s trainable parameters and layers (detaching any earlier
        ones first; the error-feedback residuals are kept, so a compacted model can be re-attached)."""
        self.detach()
        self.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if self.targets in ("weights", "both"):
            for name, param in self.parameters.items():
                self.handles.append(param.register_hook(self._weight_hook(name)))
        self.layers = []
        if self.targets in ("activations", "both"):
            for name, module in model.named_modules():
                if isinstance(module, ACTIVATION_LAYERS) and any(p.requires_grad for p in module.parameters(False)):
                    self.layers.append(name)
                    self.handles.append(module.register_forward_hook(self._activation_forward_hook))
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def reseed(self, seed: int) -> None:
        self.generators.reseed(seed)

    # ------------------------------------------------------------------ statistics
    def reset_statistics(self) -> None:
        """Zero the running sums of relative quantization error (per target)."""
        self.error_sum = {"weights": None, "activations": None}
        self.error_count = {"weights": 0, "activations": 0}

    def _record(self, target: str, reference: torch.Tensor, quantized: torch.Tensor) -> None:
        if not self.track_error:
            return
        error = relative_error(reference, quantized)
        total = self.error_sum[target]
        self.error_sum[target] = error if total is None else total + error
        self.error_count[target] += 1

    def mean_relative_error(self, target: str) -> torch.Tensor | None:
        """Mean over the tensors quantized since `reset_statistics` of ``||Q(g) - g|| / ||g||``."""
        total = self.error_sum[target]
        return None if total is None else total / self.error_count[target]

    # ------------------------------------------------------------------ error feedback state
    def commit(self) -> None:
        """Keep the residuals of the gradients since the last commit (the step was taken)."""
        if self._pending:
            self.residuals.update(self._pending)
            self._pending = {}

    def rollback(self) -> None:
        """Forget the residuals since the last commit (the step was skipped)."""
        self._pending = {}

    def cut(self, keep: Mapping[str, Mapping[int, torch.Tensor]]) -> None:
        """The model's tensors were compacted (channels removed): cut the residuals, committed and
        pending, to the positions ``keep`` kept along each shrunk dimension of each parameter (by
        name). Call `attach` on the compacted model afterwards; it keeps the residuals."""
        from stacktrain.functional.compaction import slice_like

        def cut(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: slice_like(value, value.shape, keep.get(name, {})) for name, value in tensors.items()}

        self.residuals = cut(self.residuals)
        self._pending = cut(self._pending)

    # ------------------------------------------------------------------ hooks
    def _weight_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return self.quantize_weight_gradient(name, grad)
        return hook

    def quantize_weight_gradient(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        generator = self.generators.get(grad.device)
        target = grad
        if self.error_feedback:
            residual = self._pending.get(name, self.residuals.get(name))
            if residual is not None:
                target = (grad.float() + residual * self.loss_scale)
        quantized = fake_quantize(target, self.bits, stochastic=self.stochastic, generator=generator)
        if self.error_feedback:
            finite = torch.isfinite(target)
            leftover = torch.where(finite, target.float() - quantized.float(), torch.zeros((), device=grad.device))
            self._pending[name] = leftover / self.loss_scale
        self._record("weights", target, quantized)
        return quantized.to(grad.dtype)

    def _activation_forward_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled():
            linear = isinstance(module, nn.Linear)
            output.register_hook(lambda grad: self.quantize_activation_gradient(grad, linear))

    def quantize_activation_gradient(self, grad: torch.Tensor, linear: bool) -> torch.Tensor:
        """Per-row quantization: rows are tokens (all leading dimensions) for linears, samples for
        convolutions."""
        rows = grad.reshape(-1, grad.shape[-1]) if linear and grad.ndim > 1 else grad
        quantized = fake_quantize(rows, self.bits, per_row=True, stochastic=self.stochastic,
                                  generator=self.generators.get(grad.device))
        self._record("activations", rows, quantized)
        return quantized.reshape(grad.shape)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = {}
        for name, value in state.get("residuals", {}).items():
            param = self.parameters.get(name)
            device = param.device if param is not None else value.device
            self.residuals[name] = value.to(device)
        self._pending = {}


# --------------------------------------------------------------------------------------------- DDP
#: One all-gather into one output tensor (``all_gather_single`` in newer torch, same call before).
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _BucketLayout(NamedTuple):
    """What the hook needs to know of a bucket's parameters: sizes, model indices (their noise seeds)
    and, per element, the position of its parameter in the bucket."""

    sizes: list[int]
    indices: list[int]
    segment: torch.Tensor


class CompressedCommState:
    """State of `quantized_allgather_hook`: the bit width, the rounding generators and the byte
    counters (what this rank handed to the collective, and what an fp32 all-reduce would have)."""

    def __init__(self, bits: int, *, process_group: Any = None, stochastic: bool = True) -> None:
        if int(bits) not in (4, 8):
            raise StackError("is not a supported communication width", source=type(self).__name__,
                             key="communication_bits", value=bits, fix="use 8 or 4")
        self.bits = int(bits)
        self.process_group = process_group
        self.stochastic = bool(stochastic)
        self.generators = _Generators()
        #: id(parameter) -> its index in the model: seeds each parameter's rounding noise (set by
        #: `index_parameters`; a parameter not in it uses its position in the bucket)
        self.parameter_index: dict[int, int] = {}
        #: per bucket layout (bucket index, its parameters, device): `_BucketLayout`, built once
        self.layouts: dict[tuple[Any, ...], _BucketLayout] = {}
        self.bytes_sent = 0
        self.bytes_fp32 = 0
        self.buckets = 0

    def reseed(self, seed: int) -> None:
        self.generators.reseed(seed)

    def index_parameters(self, model: torch.nn.Module) -> None:
        """Number the model's parameters (their order in ``model.parameters()``)."""
        self.parameter_index = {id(p): i for i, p in enumerate(model.parameters())}
        self.layouts = {}

    def take_counts(self) -> tuple[int, int, int]:
        """(bytes sent, fp32 all-reduce bytes, buckets) since the last call; resets the counters."""
        counts = (self.bytes_sent, self.bytes_fp32, self.buckets)
        self.bytes_sent = self.bytes_fp32 = self.buckets = 0
        return counts


def _bucket_layout(state: CompressedCommState, bucket: dist.GradBucket, device: torch.device) -> _BucketLayout:
    """The bucket's parameter sizes, seeds and element-to-parameter map, computed once per bucket layout
    (DDP keeps its buckets after the first steps) and reused."""
    parameters = bucket.parameters()
    key = (bucket.index(), tuple(id(p) for p in parameters), device)
    layout = state.layouts.get(key)
    if layout is None:
        sizes = [g.numel() for g in bucket.gradients()]
        indices = [state.parameter_index.get(id(p), position) for position, p in enumerate(parameters)]
        repeats = torch.tensor(sizes, device=device)
        segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), repeats)
        layout = state.layouts[key] = _BucketLayout(sizes, indices, segment)
    return layout


def _quantize_bucket(state: CompressedCommState, values: torch.Tensor,
                     layout: _BucketLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every parameter's k-bit codes (its own max-abs scale, its own noise stream) in a few whole-bucket
    operations: the same numbers as `quantize` called per parameter with ``for_parameter``'s generator.
    Returns (codes, scales, whether every value is finite) without a host synchronisation."""
    top = max_code(state.bits)
    absmax = torch.zeros(len(layout.sizes), device=values.device).scatter_reduce_(
        0, layout.segment, values.abs(), "amax", include_self=True)  # NaN and inf propagate
    finite = torch.isfinite(absmax)
    scale = torch.where(finite & (absmax > 0), absmax / top, torch.ones_like(absmax))
    scaled = (values / scale.index_select(0, layout.segment)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if state.stochastic:
        noise = torch.empty_like(scaled)
        start = 0
        for size, index in zip(layout.sizes, layout.indices):  # one seeded draw per parameter, no other per-parameter work
            torch.rand(size, generator=state.generators.for_parameter(values.device, index), out=noise[start : start + size])
            start += size
        scaled.add_(noise).floor_()
    else:
        scaled.round_()
    return scaled.clamp_(-top, top).to(torch.int8), scale, finite.all()


def quantized_allgather_hook(state: CompressedCommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: k-bit gradients instead of an fp32 all-reduce.

    Each rank quantizes every parameter's gradient in the bucket with its own max-abs scale and its
    own rounding noise (seeded from the step's seed and the parameter's index in the model), packs
    the codes (two per byte at 4 bits) and appends the float32 scales; one all-gather of these bytes
    per bucket, then every rank dequantizes all ranks' gradients and averages them in rank order, so
    every rank ends with the same gradient. Scales and noise are per parameter, not per bucket, so the
    result does not depend on how DDP groups parameters into buckets (a resumed run's fresh DDP model
    groups them differently); the work is done on the whole bucket at once (`_quantize_bucket`), and
    DDP runs the hook as soon as a bucket's gradients are ready, so the all-gather of one bucket
    overlaps the backward of the next. Works on gloo and NCCL. A non-finite value in a bucket is sent
    as non-finite scales, which makes the whole averaged bucket non-finite on every rank: AMP's grad
    scaler then skips the step, as it would after an fp32 all-reduce.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    values = buffer.detach().float()
    layout = _bucket_layout(state, bucket, values.device)
    codes, scale, finite = _quantize_bucket(state, values, layout)
    scale = torch.where(finite, scale, torch.full_like(scale, math.nan))
    payload = torch.cat([pack_codes(codes, state.bits), scale.view(torch.uint8)])
    gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=payload.device)
    state.bytes_sent += payload.numel()
    state.bytes_fp32 += buffer.numel() * 4
    state.buckets += 1
    work = _ALL_GATHER_SINGLE(gathered, payload, group=group, async_op=True)
    numel, count = buffer.numel(), len(layout.sizes)

    def decode(future: torch.futures.Future) -> torch.Tensor:
        rows = gathered.view(world, -1)
        codes_all = unpack_codes(rows[:, : -4 * count], state.bits, numel).float()
        # [world, count] scales (copied out of the byte rows so that the float view is aligned)
        per_parameter = rows[:, -4 * count :].clone(memory_format=torch.contiguous_format).view(torch.float32)
        total = codes_all[0].mul_(per_parameter[0].index_select(0, layout.segment))
        for rank in range(1, world):  # in rank order: the same sum on every rank
            total.add_(codes_all[rank].mul_(per_parameter[rank].index_select(0, layout.segment)))
        buffer.copy_(total.div_(world).to(buffer.dtype))
        return buffer

    return work.get_future().then(decode)


# DDP checks the hook's annotations as objects; this module's annotations are strings otherwise.
quantized_allgather_hook.__annotations__.update(
    state=CompressedCommState, bucket=dist.GradBucket, **{"return": torch.futures.Future[torch.Tensor]}
)
