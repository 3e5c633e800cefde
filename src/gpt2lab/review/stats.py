"""The statistics of a review: intervals, Bradley-Terry strengths and inter-reviewer agreement.

- win rate: Wilson score interval (Wilson 1927; Agresti & Coull 1998) at 95%, ties counted as half a win;
- mean rating: Student-t interval, mean +- t(0.975, n-1) * s / sqrt(n);
- Bradley-Terry: Hunter's MM algorithm (Hunter 2004, "MM algorithms for generalized Bradley-Terry
  models", eq. 3), ties counted as half a win to each side;
- agreement: Cohen's kappa from scikit-learn, Krippendorff's alpha from the ``krippendorff`` package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def missing_extra(exc: ImportError) -> ImportError:
    """The one-line error for a review dependency that is not installed."""
    return ImportError(f"gpt2lab review summary needs {exc.name or 'its statistics libraries'}: "
                       "pip install 'gpt2lab[review]'")


def require_extras() -> None:
    """Raise a one-line ``ImportError`` unless every summary library is installed (found, not imported:
    scikit-learn alone takes seconds to import, and is only needed for two reviewers)."""
    from importlib.util import find_spec

    for module, package in (("sklearn", "scikit-learn"), ("krippendorff", "krippendorff"), ("scipy", "scipy"),
                            ("matplotlib", "matplotlib")):
        try:
            found = find_spec(module) is not None
        except ValueError:  # in sys.modules as None: imports of it fail
            found = False
        if not found:
            raise ImportError(f"gpt2lab review summary needs {package}: pip install 'gpt2lab[review]'")


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``; ``(nan, nan)`` when ``n == 0``.

    ``successes`` may be fractional (ties counted as half a win).
    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean; low = high = nan for fewer than two values."""
    if not values:
        return math.nan, math.nan, math.nan
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass
class BradleyTerry:
    strengths: dict[str, float]  # normalised to sum to 1: P(i beats j) = s_i / (s_i + s_j)
    iterations: int
    converged: bool
    regularised: bool  # a pseudo-count was added: the comparisons alone have no finite maximum


def _strongly_connected(names: Sequence[str], wins: Mapping[tuple[str, str], float]) -> bool:
    """Whether every source has a path of wins to every other (Hunter's condition for a finite MLE)."""
    def reach(start: str, forward: bool) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            a = todo.pop()
            for b in names:
                w = wins.get((a, b), 0) if forward else wins.get((b, a), 0)
                if b not in seen and w > 0:
                    seen.add(b)
                    todo.append(b)
        return seen

    return not names or (len(reach(names[0], True)) == len(names) == len(reach(names[0], False)))


def bradley_terry(wins: Mapping[tuple[str, str], float], *, max_iter: int = 10_000,
                  tol: float = 1e-10, pseudo: float = 0.5) -> BradleyTerry:
    """Maximum-likelihood Bradley-Terry strengths from ``wins[(i, j)]`` = times i beat j (ties as 0.5 each).

    MM update (Hunter 2004): ``s_i <- W_i / sum_j n_ij / (s_i + s_j)``, then renormalise. When the
    win graph is not strongly connected (some source never beats, or never loses to, the rest) the
    maximum is at infinity; then ``pseudo`` wins are added each way on every compared pair and
    ``regularised`` is set.
    """
    names = sorted({x for pair in wins for x in pair})
    if len(names) < 2:
        return BradleyTerry({n: 1.0 for n in names}, 0, True, False)
    w = {k: float(v) for k, v in wins.items() if v}
    regularised = not _strongly_connected(names, w)
    if regularised:
        for a, b in list(wins):
            if a != b:
                w[(a, b)] = w.get((a, b), 0.0) + pseudo
                w[(b, a)] = w.get((b, a), 0.0) + pseudo
    games = {(a, b): w.get((a, b), 0.0) + w.get((b, a), 0.0) for a in names for b in names if a != b}
    total_wins = {a: sum(w.get((a, b), 0.0) for b in names if b != a) for a in names}
    s = {a: 1.0 / len(names) for a in names}
    converged, iterations = False, 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        new = {}
        for a in names:
            denom = sum(games[(a, b)] / (s[a] + s[b]) for b in names if b != a and games[(a, b)])
            new[a] = total_wins[a] / denom if denom else s[a]
        norm = sum(new.values())
        new = {a: v / norm for a, v in new.items()}
        change = max(abs(new[a] - s[a]) for a in names)
        s = new
        if change < tol:
            converged = True
            break
    return BradleyTerry(s, iterations, converged, regularised)


def cohen_kappa(a: Sequence, b: Sequence, weights: str | None = None) -> float:
    """Cohen's kappa of two reviewers' labels of the same items (scikit-learn's ``cohen_kappa_score``)."""
    try:
        from sklearn.metrics import cohen_kappa_score
    except ImportError as exc:
        raise missing_extra(exc) from None
    return float(cohen_kappa_score(list(a), list(b), weights=weights))


def krippendorff_alpha(table: Sequence[Sequence[float | None]], level: str) -> float:
    """Krippendorff's alpha of a reviewers x items table of numeric codes (None = not judged).

    ``level``: ``nominal`` or ``ordinal`` (the ``krippendorff`` package).
    """
    try:
        import krippendorff
        import numpy as np
    except ImportError as exc:
        raise missing_extra(exc) from None
    data = np.array([[np.nan if v is None else float(v) for v in row] for row in table], dtype=float)
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
