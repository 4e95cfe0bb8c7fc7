"""k-bit number formats for gradients: symmetric quantizers and INT4 packing, the math that
`stacktrain.functional.grad_quant` (the gradient quantization technique) is built on.

No Lightning here. The quantizer follows "Training Transformers with 4-bit Integers" (Xi et al.,
NeurIPS 2023): a symmetric max-abs scale, one per tensor (weight gradients) or one per row
(activation gradients), codes clamped to the signed k-bit range ``[-(2^(k-1)-1), 2^(k-1)-1]`` (+-7 at
4 bits), and stochastic rounding, which keeps the quantized gradient unbiased. Non-finite values
(inf, NaN) are left out of the scale and passed through unchanged, so AMP's grad scaler still sees
them and skips the step.

    q = quantize(gradient, bits=4, per_row=True)     # int8 codes in [-7, 7] and one scale per row
    approximation = dequantize(q)                      # unbiased: E[approximation] == gradient
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from stacktrain.errors import require_number

__all__ = [
    "QuantizedTensor",
    "check_bits",
    "max_code",
    "quantize",
    "dequantize",
    "fake_quantize",
    "rounding_noise",
    "noise_draws",
    "noise_from_draws_",
    "relative_error",
    "pack_int4",
    "unpack_int4",
    "pack_codes",
    "unpack_codes",
    "payload_bytes",
]

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


#: Resolution of `rounding_noise`: 16 bits, so ``floor(x + u)`` is off its exact mean by at most 2^-17 of a code.
NOISE_LEVELS = 2**16


def rounding_noise(numel: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``numel`` uniform values in (0, 1) for stochastic rounding, at 16-bit resolution: ``(k + 0.5) / 2^16``.

    Drawn as 64-bit random integers, four 16-bit values per draw: on CPU about half the cost of
    ``torch.rand`` (which spends one 32-bit draw per value and keeps 24 bits) for a rounding that is
    unbiased to within 2^-17 of a code step, far below the rounding's own spread. Deterministic given the
    generator's state, on every device. ``out`` (float32, ``numel`` values, may be a slice of a larger
    buffer) receives them. In two steps, `noise_draws` then `noise_from_draws_`, for callers that draw
    many pieces and convert them at once: every step is exact in float32, so the values are the same."""
    device = out.device if out is not None else device
    out = torch.empty(numel, dtype=torch.float32, device=device) if out is None else out
    return noise_from_draws_(out.copy_(noise_draws(numel, generator=generator, device=device)))


def noise_draws(numel: int, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The raw draws of `rounding_noise`: ``numel`` uniform 16-bit integers (int16)."""
    words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64, generator=generator,
                          device=device)
    return words.view(torch.int16)[:numel]


def noise_from_draws_(draws: torch.Tensor) -> torch.Tensor:
    """Float32 ``draws`` (`noise_draws` copied into a float buffer) turned into `rounding_noise`, in place."""
    return draws.add_(32768.5).mul_(1.0 / NOISE_LEVELS)  # [-32768, 32767] -> (0, 1), exactly


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
            after adding ``U(-0.5, 0.5)`` and is unbiased: ``E[dequantize(quantize(x))] = x`` (the noise is
            `rounding_noise`'s, 16-bit: unbiased to within 2^-17 of a step).
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
        noise = rounding_noise(scaled.numel(), generator=generator, device=scaled.device).view(scaled.shape)
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
        out.add_(rounding_noise(out.numel(), generator=generator, device=out.device).view(out.shape)).floor_()
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
