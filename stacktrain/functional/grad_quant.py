"""Gradient quantization, the technique's math (no Lightning): backward hooks that quantize a
model's weight and activation gradients (`apply_grad_quant` / `GradientQuantizer`), and a DDP
communication hook that sends k-bit gradients (`quantized_allgather_hook`). The number formats are in
`stacktrain.functional.quantize`, the hypernetwork compensation in
`stacktrain.functional.grad_quant_hypernet`; `stacktrain.callbacks.GradientQuantization` decides when.

    model = MyNet()
    quantizer = apply_grad_quant(model, bits=4, targets="both")
    loss_fn(model(x)).backward()       # every weight / activation gradient went through 4 bits
    quantizer.remove()                 # the model as it was
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from stacktrain.errors import StackError, require_choice
from stacktrain.functional.quantize import (check_bits, fake_quantize, max_code, pack_codes, relative_error,
                                          noise_draws, noise_from_draws_, unpack_codes)

__all__ = [
    "TARGETS",
    "ACTIVATION_LAYERS",
    "apply_grad_quant",
    "GradientQuantizer",
    "CompressedCommState",
    "quantized_allgather_hook",
    "noise_seed",
]

#: What the backward quantizer acts on: parameter gradients, activation gradients, or both.
TARGETS = ("weights", "activations", "both")

#: Layers whose output gradient ("activation gradient") is quantized: the inputs of the two backward
#: matrix products (weight gradient and input gradient) of every linear and convolution.
ACTIVATION_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def noise_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, epoch, batch...), the same on every machine: the keys of
    the rounding noise. The project's seed mixer is `stacktrain.functional.seeding.mix_seed`; this hash
    stays for the quantizers so their seeds are unchanged."""
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
        generator.manual_seed(noise_seed(self.seed, index))
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

    # ------------------------------------------------------------------ apply / remove
    def apply(self, model: nn.Module) -> GradientQuantizer:
        """Register the hooks on ``model``'s trainable parameters and layers (removing any earlier
        ones first; the error-feedback residuals are kept, so a compacted model can be re-applied)."""
        self.remove()
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

    def remove(self) -> None:
        """Remove the hooks: the model's backward is full precision again (residuals are kept)."""
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
        name). Call `apply` on the compacted model afterwards; it keeps the residuals."""
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


def apply_grad_quant(model: nn.Module, bits: int, targets: str = "both", **options: Any) -> GradientQuantizer:
    """Quantize every backward of ``model`` to ``bits``: hooks on its trainable parameters (``targets``
    "weights"), on the outputs of its `ACTIVATION_LAYERS` ("activations") or both; ``options`` are
    `GradientQuantizer`'s (``stochastic``, ``error_feedback``, ``track_error``). Returns the quantizer;
    its ``remove()`` puts the model back."""
    return GradientQuantizer(bits, targets, **options).apply(model)


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
            noise[start : start + size] = noise_draws(size, generator=state.generators.for_parameter(values.device, index),
                                                      device=values.device)
            start += size
        scaled.add_(noise_from_draws_(noise)).floor_()
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
