"""PruneRegrow attached in one line to the kind of LightningModule most projects have: no ``forward``,
``training_step`` calls ``self.net(x)``, trained from a plain ``DataLoader`` of tensors, no input shape
anywhere. `NetOnly` and `tensor_loader` are shared with tests/test_prune_regrow.py and tests/test_export.py (one process);
launched by it as 2 DDP processes (gloo)::

    python -m torch.distributed.run --nproc-per-node 2 tests/prune_regrow_attach_driver.py --out DIR --clip none

Each rank writes ``rank<k>.json``: the traced module, every update's mask digests (rank 0's broadcast
and the rank's own decision), whether it compacted, and a digest of the final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import timm
import torch
from lightning.pytorch import LightningModule, seed_everything
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_trainer  # noqa: E402
from stacktrain.callbacks import PruneRegrow  # noqa: E402

STATS = ("running_mean", "running_var", "num_batches_tracked")


class NetOnly(LightningModule):
    """A user's module: the network is an attribute, there is no forward and no example input."""

    def __init__(self) -> None:
        super().__init__()
        self.net = timm.create_model("test_resnet", in_chans=1, num_classes=4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def tensor_loader(samples: int = 64, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, 1, 16, 16, generator=generator)
    labels = torch.randint(0, 4, (samples,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def explorer() -> PruneRegrow:
    return PruneRegrow(target_flops_ratio=0.5, update_every=2, update_unit="step", explore_until=0.5,
                       compact_after_explore=True)


def run_one(name: str, clip: str, root: Path) -> dict[str, Any]:
    from stack_matrix_driver import digest

    seed_everything(0)
    callback = explorer()
    trainer = make_trainer(root, [callback], processes=2, max_steps=6)
    module = NetOnly()
    trainer.fit(module, train_dataloaders=tensor_loader())
    weights = {k: v for k, v in module.state_dict().items() if not k.endswith(STATS)}
    return {
        "traced": callback.traced, "compacted": callback.compacted,
        "history": [{k: h[k] for k in ("step", "digest", "local_digest", "flops_ratio")} for h in callback.history],
        "weights": digest(weights), "conv_shape": list(module.net.layer1[0].conv1.weight.shape),
    }


if __name__ == "__main__":
    from ddp_harness import drive

    drive(__doc__, ["attach"], run_one)
