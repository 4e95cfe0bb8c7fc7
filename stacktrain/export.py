"""`export_compact`: a checkpoint of a `PruneRegrow` run -> the compact network, as a ``torch.export``
program and as a state dict plus channel config that load without stacktrain."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
from typing import Any

import torch
from torch import nn

from stacktrain.errors import StackError, require_existing_path
from stacktrain.functional import compact_loader
from stacktrain.functional.channel_selection import ChannelPlan
from stacktrain.functional.prune_regrow_meta import PruneRegrowMeta
from stacktrain.functional.compact_loader import channel_config, config_from_state_dict, resize_modules
from stacktrain.functional.compaction import compact_network
from stacktrain.functional.flops import forward_flops

__all__ = ["export_compact", "PROGRAM_FILE", "LOADER_FILE"]

PROGRAM_FILE = "model.pt2"
LOADER_FILE = "load_compact.py"


def _technique_state(checkpoint: dict[str, Any], path: str) -> dict[str, Any]:
    for key, value in checkpoint.get("callbacks", {}).items():
        if key.split("{")[0] == "PruneRegrow":
            return value
    raise StackError(
        "holds no PruneRegrow state (was the run trained with the PruneRegrow callback?)",
        source="export_compact", key="checkpoint", value=path,
        fix="export a checkpoint of a run with stacktrain.callbacks.PruneRegrow in trainer.callbacks",
    )


def _rebuild_module(meta: PruneRegrowMeta, checkpoint: dict[str, Any]) -> nn.Module:
    """The LightningModule of the run, rebuilt from its class and saved hyper-parameters (the weights
    come from the checkpoint, so a ``pretrained`` file is not loaded again)."""
    module_path, _, qualname = meta.module_class.rpartition(".")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "pretrained" in hparams:
        hparams["pretrained"] = None
    try:
        cls: Any = importlib.import_module(module_path)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        parameters = inspect.signature(cls).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            # LightningCLI adds private entries (_class_path, _instantiator) to the saved hyper-parameters
            hparams = {k: v for k, v in hparams.items() if k in parameters}
        return cls(**hparams)
    except Exception as error:
        raise StackError(
            f"cannot rebuild the model {meta.module_class!r} from the checkpoint's hyper-parameters ({error})",
            source="export_compact", key="module", value=None,
            fix="pass module=<an instance of your LightningModule, built as for training>",
        ) from error


def export_compact(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    module: nn.Module | None = None,
    example_input: torch.Tensor | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the compact network of a `PruneRegrow` checkpoint into the directory ``out``:

    * ``model.pt2``: a ``torch.export`` program of the network (``torch.export.load(path).module()``),
      batch size dynamic;
    * ``state_dict.pt`` + ``channels.json``: the compact weights and the sizes of every prunable
      layer, for the dense architecture built by your own code (timm, torchvision);
    * ``load_compact.py``: the loader for those two (torch only; ``load_compact(model, out)``).

    The checkpoint may be taken before or after compaction: masked channels are removed here with
    Torch-Pruning. The exported network is the LightningModule's submodule that holds every pruned
    layer (``model`` of an `ImageClassifier`). ``module`` is the LightningModule to load into when it
    cannot be rebuilt from the checkpoint's class and hyper-parameters. Returns the paths, the
    network's name and its FLOPs (dense and compact, measured with the flop counter).
    An ``out`` that already holds an export is refused unless ``overwrite=True``.
    """
    path = require_existing_path(checkpoint, "checkpoint", source="export_compact")
    existing = [name for name in (PROGRAM_FILE, compact_loader.STATE_FILE, compact_loader.CONFIG_FILE, LOADER_FILE)
                if os.path.exists(os.path.join(os.fspath(out), name))]
    if existing and not overwrite:
        raise StackError(f"already holds an export ({', '.join(existing)})", source="export_compact", key="out",
                         value=os.fspath(out), fix="choose a new folder, move the earlier export away, or pass overwrite=True")
    if not os.path.isfile(path):
        raise StackError("is a folder, not a checkpoint file", source="export_compact", key="checkpoint", value=path,
                         fix="pass the .ckpt file itself (under the run's checkpoints/ folder)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: UnpicklingError, RuntimeError, EOFError
        raise StackError(f"cannot be read as a checkpoint ({type(error).__name__})", source="export_compact",
                         key="checkpoint", value=path, fix="pass a .ckpt written by a PruneRegrow run") from error
    state = _technique_state(data, path)
    meta = PruneRegrowMeta.from_dict(state, source="export_compact")
    module = module if module is not None else _rebuild_module(meta, data)
    dense_sizes = channel_config(module)
    weights = data["state_dict"]
    resize_modules(module, config_from_state_dict(module, weights), weights)
    module.load_state_dict(weights)
    module.eval()
    shape = list(meta.input_shape)
    if example_input is None:
        if not shape:
            raise StackError("the checkpoint does not record the input shape", source="export_compact",
                             key="example_input", value=None, fix="pass example_input=<one batch of inputs>")
        example_input = torch.zeros(shape)
    if not meta.compacted:
        masks = state.get("masks")
        if masks is None:
            raise StackError("the run stopped before the first pruning step: nothing is pruned yet",
                             source="export_compact", key="checkpoint", value=path,
                             fix="export a checkpoint taken after training started")
        traced = module.get_submodule(meta.traced) if meta.traced else module
        plan = ChannelPlan.build(traced, example_input[:1], ignore=meta.ignore, prune_residual=meta.prune_residual)
        if [g.name for g in plan.groups] != meta.group_names:
            raise StackError("the model's channel groups differ from the checkpoint's", source="export_compact",
                             key="module", value=type(module).__name__,
                             fix="pass the LightningModule the checkpoint was trained with")
        plan.apply_masks(traced, masks)
        compact_network(traced, plan, masks, example_input[:1])
    name = meta.network
    network = module.get_submodule(name) if name else module
    network.eval()
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    batch = example_input.expand(2, *example_input.shape[1:]).contiguous() if example_input.shape[0] == 1 else example_input
    with torch.no_grad():
        program = torch.export.export(network, (batch,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    program_path = os.path.join(out, PROGRAM_FILE)
    torch.export.save(program, program_path)
    prefix = f"{name}." if name else ""
    state_path = os.path.join(out, compact_loader.STATE_FILE)
    torch.save({k: v.detach().clone() for k, v in network.state_dict().items()}, state_path)
    compact_flops = forward_flops(network, example_input[:1])
    config = {
        "network": name,
        "module_class": meta.module_class,
        "hyperparameters": json.loads(json.dumps(data.get("hyper_parameters") or {}, default=str)),
        "input_shape": list(example_input[:1].shape),
        "flops": {"dense": int(meta.dense_flops), "compact": int(compact_flops)},
        "layers": channel_config(network),
        "dense_layers": {k[len(prefix):]: v for k, v in dense_sizes.items() if k.startswith(prefix)},
    }
    config_path = os.path.join(out, compact_loader.CONFIG_FILE)
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=1)
    loader_path = os.path.join(out, LOADER_FILE)
    shutil.copyfile(compact_loader.__file__, loader_path)
    return {
        "program": program_path, "state_dict": state_path, "config": config_path, "loader": loader_path,
        "network": name, "dense_flops": config["flops"]["dense"], "compact_flops": int(compact_flops),
    }
