"""The one seed mixer: a 63-bit seed from a tuple of integers (seed, rank, step, batch...).

Random decisions that must be reproducible (a resumed run draws what the uninterrupted run drew) or
equal on every rank seed a generator from their key instead of drawing from the global RNG; every
place that does so mixes its key here, so two keys that differ anywhere give different streams.
"""

from __future__ import annotations

__all__ = ["mix_seed", "SEED_MULTIPLIERS"]

#: Primes that weight the parts of a key: ``((p0 * m0 + p1) * m1 + p2) * m2 + ...``. The first three
#: are those the stack (`step_generator`), token dropout and the data modules have always used, so the
#: random streams (and every published figure) are unchanged.
SEED_MULTIPLIERS = (1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081, 1_000_099)

_MODULUS = 2**63 - 1


def mix_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63 - 1)`` from integers, the same on every machine and process.

    ``mix_seed(seed, step)`` is `stacktrain.stack.step_generator`'s seed; the parts are weighted by
    `SEED_MULTIPLIERS` (a polynomial in the parts, exact in Python integers).
    """
    if not parts:
        raise ValueError("mix_seed needs at least one part")
    if len(parts) > len(SEED_MULTIPLIERS):
        raise ValueError(f"mix_seed takes at most {len(SEED_MULTIPLIERS)} parts, got {len(parts)}")
    value = int(parts[0])
    for multiplier, part in zip(SEED_MULTIPLIERS, parts[1:]):
        value = value * multiplier + int(part)
    return value % _MODULUS
