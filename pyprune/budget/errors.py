"""The error budget planning raises for a target it cannot meet or a malformed request."""
from ..errors import PyPruneError


class BudgetError(PyPruneError):
    """A budget target is malformed or cannot be met (e.g. below what the model costs with every unit at its floor).
    Raised before anything is changed."""
