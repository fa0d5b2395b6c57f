"""mmrazor compatibility: its documented and tested behaviour, its test models and published configs, on pyprune.

A package (like tests/ops) so its module names (compat.test_*) cannot collide with test files elsewhere in tests/.
Models written the way mmcls / mmrazor's tests name modules live in compat/models.py; configs in compat/fixtures/.
"""
