"""The accuracy-budgeted search: the fastest plan that keeps the user's accuracy on their data.

Entry points: :func:`search` (``attnopt.compile(model, ..., calibration=data,
budget=attnopt.Budget(...))`` runs it), :class:`SearchReport` (``cm.search_report``),
:data:`FAMILIES`. How it searches: :mod:`attnopt.search.search`; what it tries:
:mod:`attnopt.search.space`.
"""

from attnopt.search.report import SearchPoint, SearchReport
from attnopt.search.search import EXACT_PIPELINE, search
from attnopt.search.space import FAMILIES

__all__ = ["EXACT_PIPELINE", "FAMILIES", "SearchPoint", "SearchReport", "search"]
