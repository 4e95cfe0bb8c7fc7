"""MetaGrad: a hypernetwork that turns quantized gradients into the update, trained by the next loss.

MetaGrad (Xu et al., ICIP 2023) feeds the low-precision gradient through a small shared network
whose output is the weight update, and builds that update into the next iteration's computation
graph, so that the next loss trains the network. The same pattern is MetaQuant's (Chen et al.,
NeurIPS 2019, csyhhu/MetaQuant): an element-wise meta-network shared by all layers, trained with its
own Adam (lr 1e-3), whose output replaces the weight gradient before the model's optimizer step.

Here, for every trainable tensor with gradient ``g`` (already quantized and, under DDP,
all-reduced) and learning rate ``lr``:

* the update is ``u = H(g)`` (optionally ``H(g, w)``): ``.grad`` is replaced by ``u`` and the
  model's own optimizer applies it, so the next weights are ``w' = w - lr * H(g)`` (plain SGD, and
  the current step of SGD with momentum; Adam transforms ``u`` further, and this SGD model is then
  MetaQuant's approximation: a linearisation through Adam's per-element step size was tried on the
  digits and did no better);
* the next loss ``L(w')`` is differentiated with respect to the hypernetwork's weights ``theta``
  through ``w'``: ``dL/dtheta = -lr * <dL/dw', dH(g)/dtheta>``. `HypernetCompensation.transform`
  computes exactly this vector-Jacobian product when the next gradient ``dL/dw'`` is known, which is
  the gradient that building ``w - lr * (H(g) - H(g).detach())`` into the next forward (with
  ``torch.func.functional_call``, MetaQuant's injection) would give, without touching the forward.
  tests/test_grad_quant_functional.py checks the two against each other.

``H`` is element-wise and scale-equivariant: ``H(g) = s * (x + MLP(x))`` with ``x = g / s`` and
``s`` the RMS of the tensor's finite entries. Two kinds (`HYPERNET_KINDS`):

* ``"mlp"``: bias-free, tanh; with the gradient as the only input an odd function (a learned,
  symmetric shrinkage/expansion of gradient values);
* ``"linear"``: MetaQuant's reported meta-network ("MetaFC", Nonlinear-None): two bias-free linears
  1 -> hidden -> 1 without a nonlinearity, so ``H(g) = (1 + a) * g`` with the learned gain
  ``a = W2 W1`` (per input feature); the RMS normalisation does not change a linear map.

Both have their output layer at zero, so training starts as plain quantized SGD (MetaQuant starts
from a random gain; a stated deviation: the identity start keeps the first steps those of plain SGD).
Which tensors go through ``H`` is the caller's choice: MetaQuant's are the conv and linear weights,
biases and norms take the plain (quantized) step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stacktrain.errors import require_choice, require_number
from stacktrain.optim import all_finite

__all__ = ["HYPERNET_INPUTS", "HYPERNET_KINDS", "GradientHyperNetwork", "HypernetCompensation", "ParamUpdate",
           "HYPERNET_TARGETS", "default_hidden", "hypernet_parameter_names"]

#: What the hypernetwork sees of each element: its gradient, or its gradient and its weight
#: (MetaQuant's g * M(w) variant).
HYPERNET_INPUTS = ("gradient", "gradient_and_weight")
#: The hypernetwork's form: MetaQuant's linear meta-network, or an RMS-normalised tanh MLP.
HYPERNET_KINDS = ("linear", "mlp")

#: Which gradients go through the hypernetwork: conv and linear weights (MetaQuant's; biases, norms and
#: embeddings take the plain step), or every trainable tensor.
HYPERNET_TARGETS = ("weights", "all")


def hypernet_parameter_names(model: nn.Module, targets: str) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the trainable tensors the hypernetwork transforms:
    the ``weight`` of every Linear/Conv layer for ``"weights"``, every trainable tensor for ``"all"``."""
    from stacktrain.functional.grad_quant import ACTIVATION_LAYERS

    require_choice(targets, "hypernet_targets", HYPERNET_TARGETS, source="HypernetCompensation")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if targets == "all":
        return trainable
    names = {f"{prefix}.weight" if prefix else "weight" for prefix, module in model.named_modules()
             if isinstance(module, ACTIVATION_LAYERS) and getattr(module, "weight", None) is not None}
    return names & trainable


def default_hidden(kind: str) -> int:
    """Hidden width when none is given: MetaQuant's 100 for ``linear``, 16 for ``mlp``."""
    return 100 if kind == "linear" else 16


def _rms(x: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(x)
    clean = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    count = finite.sum().clamp_min(1)
    rms = torch.sqrt(clean.pow(2).sum() / count)
    return torch.where(rms > 0, rms, torch.ones_like(rms))


class GradientHyperNetwork(nn.Module):
    """The shared element-wise network ``H``: ``H(g[, w]) = s * (x + W2 f(W1 [x, w / rms(w)]))`` with
    ``f = tanh`` (``kind="mlp"``) or the identity (``kind="linear"``).

    Args:
        hidden: width of the hidden layer (MetaQuant uses ~100 for 1-bit weights; a few dozen
            parameters suffice for a scalar map).
        inputs: ``"gradient"`` or ``"gradient_and_weight"`` (MetaQuant's g * M(w) variant).
        generator: initialises ``W1`` (``W2`` starts at zero); pass one so that creating the
            network does not draw from the global RNG.
        kind: ``"mlp"`` or ``"linear"`` (`HYPERNET_KINDS`).
    """

    def __init__(self, hidden: int = 16, inputs: str = "gradient", generator: torch.Generator | None = None,
                 kind: str = "mlp") -> None:
        super().__init__()
        require_number(hidden, "hypernet_hidden", source=type(self).__name__, low=1, integer=True)
        self.inputs = require_choice(inputs, "hypernet_inputs", HYPERNET_INPUTS, source=type(self).__name__)
        self.kind = require_choice(kind, "hypernet", HYPERNET_KINDS, source=type(self).__name__)
        features = 1 if inputs == "gradient" else 2
        self.hidden = nn.Linear(features, hidden, bias=False)
        self.output = nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(hidden, features, generator=generator))
            self.output.weight.zero_()

    def forward(self, grad: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``context``: the weight, for ``inputs="gradient_and_weight"`` (normalised by its RMS)."""
        g = grad.detach().float()
        scale = _rms(g)
        x = g.reshape(-1, 1) / scale
        features = x
        if self.inputs != "gradient":
            if context is None:
                raise ValueError(f"GradientHyperNetwork(inputs={self.inputs!r}) needs the weight as context")
            c = context.detach().float().reshape(-1, 1)
            features = torch.cat([x, c / _rms(c)], dim=1)
        hidden = self.hidden(features)
        correction = self.output(torch.tanh(hidden) if self.kind == "mlp" else hidden)
        return ((x + correction) * scale).reshape(grad.shape)


@dataclass
class ParamUpdate:
    """What the hypernetwork saw for one tensor at the last step (gradient, and the weight if it
    uses it) and the learning rate that applied its update: what the next loss is differentiated
    through."""

    grad: torch.Tensor
    context: torch.Tensor | None
    lr: float


class HypernetCompensation:
    """The hypernetwork, its optimizer, and the last step's inputs (`ParamUpdate` per tensor).

    Per optimizer step, after the backward and before the model's optimizer:
    ``transform(named_params_and_lrs)`` trains the hypernetwork on the new gradients (the
    vector-Jacobian product of the previous update) and replaces every ``.grad`` by ``H(.grad)``;
    then ``commit()`` once the step was really taken (``rollback()`` if it was skipped).
    A step whose gradients hold inf or NaN changes nothing: no hypernetwork step, gradients left as
    they are for the grad scaler (or the optimizer) to handle as without the hypernetwork.
    """

    def __init__(self, hidden: int | None = None, inputs: str = "gradient", meta_lr: float = 1e-2, seed: int = 0,
                 device: torch.device | str = "cpu", kind: str = "mlp") -> None:
        require_number(meta_lr, "meta_lr", source=type(self).__name__, low=0.0, low_inclusive=False)
        generator = torch.Generator().manual_seed(int(seed))
        hidden = default_hidden(kind) if hidden is None else hidden
        self.net = GradientHyperNetwork(hidden, inputs, generator=generator, kind=kind).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=meta_lr)
        self.previous: dict[str, ParamUpdate] = {}
        self._pending: dict[str, ParamUpdate] = {}
        self.last_meta_grad_norm: float | None = None

    def _context(self, param: torch.Tensor) -> torch.Tensor | None:
        return param.detach().clone() if self.net.inputs == "gradient_and_weight" else None

    def to(self, device: torch.device | str) -> HypernetCompensation:
        self.net.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    state[key] = value.to(device)
        return self

    def meta_backward(self, params: Sequence[tuple[str, nn.Parameter, float]]) -> bool:
        """Accumulate ``dL/dtheta`` of the loss whose gradients are now in ``.grad``, through the
        previous updates; returns whether any previous update was differentiated."""
        used = False
        for name, param, _ in params:
            previous = self.previous.get(name)
            if previous is None or param.grad is None:
                continue
            with torch.enable_grad():
                update = self.net(previous.grad, previous.context)
            # w' = w - lr * H(g): dL/dtheta = (dL/dw') . (dw'/dtheta) = -lr * <grad, dH/dtheta>
            update.backward(gradient=-previous.lr * param.grad.detach().float())
            used = True
        return used

    def transform(self, params: Sequence[tuple[str, nn.Parameter, float]]) -> bool:
        """Train ``H`` on the current gradients, then replace each gradient by its update ``H(g)``.
        Returns False (and changes nothing) if a gradient is not finite."""
        grads = [p.grad for _, p, _ in params if p.grad is not None]
        if not grads:
            return False
        if not bool(all_finite(grads)):
            self._pending = {}
            return False
        self.optimizer.zero_grad(set_to_none=True)
        if self.meta_backward(params):
            norms = [p.grad.norm() for p in self.net.parameters() if p.grad is not None]
            self.last_meta_grad_norm = float(torch.stack(norms).norm()) if norms else 0.0
            self.optimizer.step()
        self._pending = {}
        with torch.no_grad():
            for name, param, lr in params:
                if param.grad is None:
                    continue
                grad = param.grad.detach().clone()
                context = self._context(param)
                self._pending[name] = ParamUpdate(grad, context, float(lr))
                param.grad.copy_(self.net(grad, context).to(param.grad.dtype))
        return True

    def commit(self) -> None:
        """The model's optimizer applied the updates: the next loss differentiates through them."""
        if self._pending:
            self.previous = self._pending
            self._pending = {}

    def rollback(self) -> None:
        """The step was skipped: the weights did not move, so the next loss says nothing about it."""
        self._pending = {}

    def cut(self, keep: Mapping[str, Mapping[int, torch.Tensor]]) -> None:
        """The model's tensors were compacted (channels removed): cut the last step's gradients and
        weights to the positions ``keep`` kept along each shrunk dimension, so the next loss still
        differentiates through the update of every remaining weight."""
        from stacktrain.functional.compaction import slice_like

        for name, item in self.previous.items():
            dims = keep.get(name, {})
            if not dims:
                continue
            item.grad = slice_like(item.grad, item.grad.shape, dims)
            if item.context is not None:
                item.context = slice_like(item.context, item.context.shape, dims)
        self._pending = {}

    # ------------------------------------------------------------------ state (tensors, numbers only)
    def state_dict(self) -> dict[str, Any]:
        previous = {}
        for name, item in self.previous.items():
            entry: dict[str, Any] = {"grad": item.grad.detach().cpu().clone(), "lr": item.lr}
            if item.context is not None:
                entry["context"] = item.context.detach().cpu().clone()
            previous[name] = entry
        return {
            "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "previous": previous,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.net.load_state_dict(state["net"])
        self.net.to(device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.to(device)
        self.previous = {
            name: ParamUpdate(entry["grad"].to(device), entry["context"].to(device) if "context" in entry else None,
                              float(entry["lr"]))
            for name, entry in state.get("previous", {}).items()
        }
        self._pending = {}
