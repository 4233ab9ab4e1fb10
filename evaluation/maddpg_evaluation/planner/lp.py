"""A linear program assembled in blocks with numpy and scipy.sparse, solved by HiGHS (``highspy``).

Variables are added as blocks (arrays of columns with bounds and costs); constraints as blocks of rows given as
sums of (columns, coefficients) terms, with lower and upper bounds. Nothing is built element by element in Python.

Warm start: a receding-horizon planner solves nearly the same LP every step, one hour later. Blocks that carry a
``name`` and ``labels`` (the global time step, day or session of each position along their last axis) let the next
LP start from the previous optimal basis, moved to the positions with the same labels (a new last step copies the
old last one). HiGHS takes it as an "alien" basis and repairs what no longer fits; from there the dual simplex needs
a few hundred iterations instead of a few thousand.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sparse

from maddpg_core.errors import PlannerError

INF = np.inf
LOWER, BASIC, UPPER, ZERO = 0, 1, 2, 3   # highspy.HighsBasisStatus values


@dataclass
class Block:
    index: np.ndarray                # columns (or rows) of the block
    labels: np.ndarray               # sorted labels of the positions along the block's last axis


@dataclass
class Solution:
    x: np.ndarray
    objective: float
    iterations: int
    col_status: np.ndarray
    row_status: np.ndarray
    col_blocks: dict[str, Block]
    row_blocks: dict[str, Block]


@dataclass
class LinearProgram:
    """minimise cost @ x subject to row_lower <= A x <= row_upper, lower <= x <= upper."""

    lower: list[np.ndarray] = field(default_factory=list)
    upper: list[np.ndarray] = field(default_factory=list)
    cost: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    cols: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    row_lower: list[np.ndarray] = field(default_factory=list)
    row_upper: list[np.ndarray] = field(default_factory=list)
    n_cols: int = 0
    n_rows: int = 0
    col_blocks: dict[str, Block] = field(default_factory=dict)
    row_blocks: dict[str, Block] = field(default_factory=dict)

    def variables(self, shape, lower=0.0, upper=INF, cost=0.0, *, name: str | None = None,
                  labels=None) -> np.ndarray:
        """A block of columns; returns their indices with ``shape`` (bounds and costs broadcast to it)."""
        size = int(np.prod(shape))
        index = np.arange(self.n_cols, self.n_cols + size).reshape(shape)
        if name is not None:
            self.col_blocks[name] = Block(index, np.asarray(labels))
        self.n_cols += size
        self.lower.append(np.broadcast_to(np.asarray(lower, dtype=np.float64), shape).ravel().copy())
        self.upper.append(np.broadcast_to(np.asarray(upper, dtype=np.float64), shape).ravel().copy())
        self.cost.append(np.broadcast_to(np.asarray(cost, dtype=np.float64), shape).ravel().copy())
        return index

    def add_cost(self, index: np.ndarray, cost) -> None:
        """Add ``cost`` to existing columns (a later term of the objective on variables made earlier)."""
        flat = np.concatenate(self.cost)
        np.add.at(flat, np.ravel(index), np.broadcast_to(np.asarray(cost, dtype=np.float64), np.shape(index)).ravel())
        self.cost = [flat]

    def constraints(self, terms: list[tuple[np.ndarray, object]], lower=-INF, upper=INF, *, name: str | None = None,
                    labels=None) -> np.ndarray:
        """Rows ``lower <= sum_k coef_k * x[index_k] <= upper``, one per element of the broadcast shape of the terms.

        Each term is ``(column indices, coefficients)``; every term's indices have the rows' shape, or the rows'
        shape plus one trailing axis (a sum over that axis, e.g. over buildings).
        """
        shape = _rows_shape(terms)
        size = int(np.prod(shape)) if shape else 1
        row_index = np.arange(self.n_rows, self.n_rows + size).reshape(shape)
        if name is not None:
            self.row_blocks[name] = Block(row_index, np.asarray(labels))
        for index, coef in terms:
            index = np.asarray(index)
            coef = np.broadcast_to(np.asarray(coef, dtype=np.float64), index.shape)
            rows = np.broadcast_to(row_index.reshape(shape + (1,) * (index.ndim - len(shape))), index.shape)
            keep = index >= 0  # -1 marks "no such variable here" (e.g. no car parked at this step)
            self.rows.append(rows[keep])
            self.cols.append(index[keep])
            self.values.append(coef[keep])
        self.row_lower.append(np.broadcast_to(np.asarray(lower, dtype=np.float64), shape).ravel().copy())
        self.row_upper.append(np.broadcast_to(np.asarray(upper, dtype=np.float64), shape).ravel().copy())
        self.n_rows += size
        return row_index

    def solve(self, *, warm_start: Solution | None = None, method: str = "simplex") -> Solution:
        """``method``: ``simplex`` (HiGHS's dual simplex; warm-startable) or ``ipm`` (interior point then crossover:
        much faster on one large LP, such as a whole window solved at once)."""
        import highspy

        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64)
        cols = np.concatenate(self.cols) if self.cols else np.zeros(0, dtype=np.int64)
        values = np.concatenate(self.values) if self.values else np.zeros(0)
        matrix = sparse.csc_matrix((values, (rows, cols)), shape=(self.n_rows, self.n_cols))
        cost = np.concatenate(self.cost)
        col_lower, col_upper = np.concatenate(self.lower), np.concatenate(self.upper)
        row_lower = np.concatenate(self.row_lower) if self.row_lower else np.zeros(0)
        row_upper = np.concatenate(self.row_upper) if self.row_upper else np.zeros(0)
        model = highspy.HighsLp()
        model.num_col_, model.num_row_ = self.n_cols, self.n_rows
        model.col_cost_, model.col_lower_, model.col_upper_ = cost, col_lower, col_upper
        model.row_lower_, model.row_upper_ = row_lower, row_upper
        model.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        model.a_matrix_.start_ = matrix.indptr
        model.a_matrix_.index_ = matrix.indices
        model.a_matrix_.value_ = matrix.data
        solver = new_solver()
        solver.setOptionValue("output_flag", False)
        solver.setOptionValue("threads", 1)
        solver.setOptionValue("solver", method)
        if method == "ipm":
            solver.setOptionValue("run_crossover", "off")  # the plan needs values, not a basis
        solver.passModel(model)
        if warm_start is not None:
            basis = highspy.HighsBasis()
            col_status = _carry(self.col_blocks, warm_start.col_blocks, warm_start.col_status,
                                _nonbasic_at_bound(col_lower, col_upper))
            row_status = _carry(self.row_blocks, warm_start.row_blocks, warm_start.row_status,
                                np.full(self.n_rows, BASIC))
            statuses = [highspy.HighsBasisStatus(v) for v in range(5)]   # indexing a list beats 5,000 constructors
            basis.col_status = [statuses[v] for v in _fit_bounds(col_status, col_lower, col_upper).tolist()]
            basis.row_status = [statuses[v] for v in _fit_bounds(row_status, row_lower, row_upper).tolist()]
            basis.alien, basis.valid = True, True
            solver.setBasis(basis)
        solver.run()
        status = solver.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal:
            raise PlannerError(f"the planning LP was not solved ({solver.modelStatusToString(status)}): "
                               f"report the window and options that led here")
        basis = solver.getBasis()
        x = np.asarray(solver.getSolution().col_value)
        return Solution(x=x, objective=float(cost @ x), iterations=int(solver.getInfo().simplex_iteration_count),
                        col_status=np.array([v.value for v in basis.col_status], dtype=np.int8),
                        row_status=np.array([v.value for v in basis.row_status], dtype=np.int8),
                        col_blocks=self.col_blocks, row_blocks=self.row_blocks)


def _carry(new_blocks: dict[str, Block], old_blocks: dict[str, Block], old_status: np.ndarray,
           default: np.ndarray) -> np.ndarray:
    """Statuses of the previous basis moved to the positions with the same labels (past its end: its last)."""
    status = default.copy()
    for name, new in new_blocks.items():
        old = old_blocks.get(name)
        if old is None or old.index.shape[:-1] != new.index.shape[:-1] or old.labels.size == 0:
            continue
        position = np.clip(np.searchsorted(old.labels, new.labels), 0, old.labels.size - 1)
        beyond = new.labels > old.labels[-1]
        position = np.where(beyond, old.labels.size - 1, position)
        use = beyond | (old.labels[position] == new.labels)
        status[new.index[..., use]] = old_status[old.index[..., position[use]]]
    return status


def _nonbasic_at_bound(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(lower), LOWER, np.where(np.isfinite(upper), UPPER, ZERO)).astype(np.int8)


def _fit_bounds(status: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """A nonbasic status must sit at a bound that exists (bounds differ between two steps' LPs)."""
    status = status.copy()
    at_bound = _nonbasic_at_bound(lower, upper)
    wrong = ((status == LOWER) & ~np.isfinite(lower)) | ((status == UPPER) & ~np.isfinite(upper)) | \
            ((status == ZERO) & (np.isfinite(lower) | np.isfinite(upper)))
    status[wrong] = at_bound[wrong]
    return status


def _rows_shape(terms) -> tuple[int, ...]:
    shapes = [np.shape(index) for index, _ in terms]
    return min(shapes, key=len)


_first_solver = threading.Lock()
_banner_shown = False


def new_solver():
    """A ``highspy.Highs()``, without the copyright banner HiGHS prints on stdout (from C, before any option can be
    set) when the first one of a process is made: a command's output is its table, not a solver's greeting."""
    global _banner_shown
    import highspy

    with _first_solver:
        if _banner_shown:
            return highspy.Highs()
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), 1)
                try:
                    solver = highspy.Highs()
                finally:
                    ctypes.CDLL(None).fflush(None)  # C's buffered banner goes to /dev/null, not to what fd 1 is next
            _banner_shown = True
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        return solver
