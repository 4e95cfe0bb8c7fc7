"""The metadata a `PruneRegrow` checkpoint carries next to its masks, as one typed, versioned schema:
the callback writes it, the callback reads it on resume, and `stacktrain.export.export_compact` reads
it to rebuild and compact the network. A checkpoint of another version fails with a clear error."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from stacktrain.errors import StackError

__all__ = ["PRUNE_REGROW_META_VERSION", "PruneRegrowMeta"]

#: 2: ``traced`` (the submodule the channels were traced on) and ``prune_residual`` added.
PRUNE_REGROW_META_VERSION = 2
#: versions this code reads (version 1 lacks the fields of 2, whose defaults are what it did).
READABLE_VERSIONS = (1, 2)


@dataclass
class PruneRegrowMeta:
    """What a `PruneRegrow` run must remember to resume, and to export its compact network.

    ``traced``: the submodule (of the LightningModule) whose channels were traced, "" for the module
    itself; ``network``: the submodule that holds every pruned layer (what export writes);
    ``input_shape``: one sample's input to ``traced`` (batch 1)."""

    version: int = PRUNE_REGROW_META_VERSION
    module_class: str = ""
    traced: str = ""
    network: str = ""
    input_shape: list[int] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    prune_residual: bool = True
    group_names: list[str] = field(default_factory=list)
    dense_flops: int = 0
    compacted: bool = False
    compacted_at: int = -1
    compact_flops: int = 0
    layer_sizes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any], *, source: str = "PruneRegrow") -> "PruneRegrowMeta":
        """The schema's fields of ``state`` (other keys, such as the masks, are ignored); a version
        this code cannot read raises `StackError`."""
        version = state.get("version")
        if version not in READABLE_VERSIONS:
            raise StackError(
                f"of the PruneRegrow state is not one this stacktrain reads ({', '.join(map(str, READABLE_VERSIONS))})",
                source=source, key="version", value=version,
                fix="use the stacktrain version that wrote the checkpoint, or train the run again",
            )
        names = {f.name for f in fields(cls)}
        meta = cls(**{k: v for k, v in state.items() if k in names})
        meta.version = PRUNE_REGROW_META_VERSION
        meta.input_shape = [int(v) for v in meta.input_shape]
        return meta
