"""DynamicOp tests, one file per layer family plus the table-driven reference checks (test_reference.py).

A package so its module names (ops.test_*) cannot collide with test files of the same name elsewhere in tests/."""
