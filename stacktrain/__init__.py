"""stacktrain: training-efficiency techniques as Lightning callbacks and modules that stack.

The techniques live in `stacktrain.callbacks` and `stacktrain.lightning_modules`, data in
`stacktrain.datamodules`, their math in `stacktrain.functional`, and the stack contract in
`stacktrain.stack`.
"""

from stacktrain.errors import StackError

__version__ = "0.1.0"

__all__ = ["StackError", "__version__"]
