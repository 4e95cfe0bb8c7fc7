"""The techniques' math as plain torch functions and modules: no Lightning, testable alone."""
