"""stacktrain: training-efficiency techniques as Lightning callbacks and modules that stack.

The techniques live in `stacktrain.callbacks` and `stacktrain.lightning_modules`, data in
`stacktrain.datamodules`, their math in `stacktrain.functional`, and the stack contract in
`stacktrain.stack`.
"""

from stacktrain.errors import StackError

__version__ = "0.1.0"

__all__ = ["StackError", "__version__", "export_compact"]


def __getattr__(name: str):
    # imported on first use: `import stacktrain` stays light (no Lightning, no torch.export)
    if name == "export_compact":
        from stacktrain.export import export_compact

        return export_compact
    raise AttributeError(f"module 'stacktrain' has no attribute {name!r}")
