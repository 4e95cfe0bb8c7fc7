"""`stacktrain.export` (`export_compact`): a PruneRegrow checkpoint becomes a compact network that loads
without stacktrain (torch.export program, state_dict + channels.json + load_compact.py) and gives the
masked model's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from lightning.pytorch import seed_everything

from conftest import make_trainer
from ddp_harness import subprocess_env
from resume_harness import load_checkpoint_weights_only
from stacktrain.callbacks import PruneRegrow
from stacktrain.functional.prune_regrow_meta import PruneRegrowMeta
from stacktrain.lightning_modules import ImageClassifier
from test_prune_regrow import MODEL, fit

EXPORT_CHECK = r"""
import json, sys, torch, timm
out, expected_path = sys.argv[1], sys.argv[2]
expected = torch.load(expected_path, weights_only=True)
program = torch.export.load(f"{out}/model.pt2").module()
config = json.load(open(f"{out}/channels.json"))
sys.path.insert(0, out)
from load_compact import load_compact
hp = config["hyperparameters"]
model = load_compact(timm.create_model(hp["model_name"], num_classes=hp["num_classes"], in_chans=hp["in_chans"]), out)
with torch.no_grad():
    from_program, from_state = program(expected["x"]), model(expected["x"])
assert "stacktrain" not in sys.modules, "the export must load without stacktrain"
print(json.dumps({"program": (from_program - expected["logits"]).abs().max().item(),
                  "state_dict": (from_state - expected["logits"]).abs().max().item(),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def test_export_loads_without_stacktrain_and_gives_the_masked_logits(tmp_path):
    from stacktrain import export_compact

    explorer = PruneRegrow(target_flops_ratio=0.5, update_every=3, update_unit="step", explore_until=0.6)
    module, trainer = fit([explorer], 10, tmp_path)
    checkpoint = tmp_path / "masked.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert load_checkpoint_weights_only(str(checkpoint))["callbacks"]["PruneRegrow"]["masks"] is not None
    module.eval()
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = module(x)
    torch.save({"x": x, "logits": logits}, tmp_path / "expected.pt")
    result = export_compact(checkpoint, tmp_path / "export")
    assert result["network"] == "model" and abs(result["compact_flops"] / result["dense_flops"] - 0.5) <= 0.025
    config = json.loads((tmp_path / "export" / "channels.json").read_text())
    assert config["flops"]["compact"] == result["compact_flops"]
    check = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, str(tmp_path / "export"), str(tmp_path / "expected.pt")],
        cwd=tmp_path, env=subprocess_env(threads=2), capture_output=True, text=True, timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    errors = json.loads(check.stdout.strip().splitlines()[-1])
    assert errors["program"] < 1e-4 and errors["state_dict"] < 1e-4
    assert errors["params"] < sum(p.numel() for p in module.model.parameters())


def test_export_of_a_module_without_forward_traces_its_network(tmp_path):
    """Traced on the first batch under ``net``: the export rebuilds the plan on that submodule."""
    from prune_regrow_attach_driver import NetOnly, tensor_loader
    from stacktrain import export_compact

    seed_everything(0)
    callback, module = PruneRegrow(target_flops_ratio=0.5, update_every=2, update_unit="step"), NetOnly()
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    trainer.fit(module, train_dataloaders=tensor_loader())
    checkpoint = tmp_path / "net.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert load_checkpoint_weights_only(str(checkpoint))["callbacks"]["PruneRegrow"]["traced"] == "net"
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = module.net.eval()(x)
    result = export_compact(checkpoint, tmp_path / "export", module=NetOnly())
    assert result["network"] == "net" and 0.45 <= result["compact_flops"] / result["dense_flops"] <= 0.5
    compact = torch.export.load(result["program"]).module()
    assert torch.allclose(compact(x), masked, atol=1e-4)


def test_export_rebuilds_a_module_saved_through_the_cli():
    """LightningCLI stores private entries with the hyper-parameters; a weights file named in
    ``pretrained`` is not needed (the weights come from the checkpoint)."""
    from stacktrain.export import _rebuild_module

    hparams = {"_class_path": "stacktrain.lightning_modules.ImageClassifier", "_instantiator": "x",
               "model_name": MODEL, "in_chans": 1, "num_classes": 10, "pretrained": "/no/such/file.pth"}
    module = _rebuild_module(PruneRegrowMeta(module_class="stacktrain.lightning_modules.classifier.ImageClassifier"),
                             {"hyper_parameters": hparams})
    assert isinstance(module, ImageClassifier) and module.hparams.model_name == MODEL
