"""Unblind the CSVs of a rating study and compare the methods: boxplots and Wilcoxon tests (paper Fig. 3).

For every criterion and every pair of methods (A, B):

- the paper's Wilcoxon rank-sum test over all ratings of A against all ratings of B, as
  ``scipy.stats.mannwhitneyu`` (two-sided; the same test, with the tie correction that six-level
  ratings need), with the rank-biserial correlation ``r = 2 U_A / (n_A n_B) - 1`` as effect size:
  the probability that a rating of A beats one of B minus the reverse, in [-1, 1];
- the Wilcoxon signed-rank test on paired ratings: the same rater's ratings of A and B on the same
  slice (``scipy.stats.wilcoxon``, two-sided, zero differences dropped, scipy's default method: exact
  or permutation for small samples, tie-corrected normal approximation for large ones), with the
  matched-pairs rank-biserial correlation ``r = (R+ - R-) / (R+ + R-)`` over the ranks of the
  non-zero ``|A - B|`` (Kerby 2014).

Positive effect sizes mean A is rated higher. p-values are not adjusted for multiple comparisons.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

from ..errors import InputError
from ..files import remove_quietly, replace_together, temp_file_beside
from ..volumes import make_output_dir
from .rating_study import CRITERIA, CSV_COLUMNS, KEY_FORMAT, SCALE

CRITERION_KEYS = tuple(c for c, _, _ in CRITERIA)
CRITERION_LABELS = {c: label for c, label, _ in CRITERIA}
REPORT_FILES = ("report.md", "summary.csv", "pairwise.csv", "boxplots.png")


@dataclass(frozen=True)
class StudyKey:
    """What ``key.json`` says: the study id, the methods in command-line order, trial -> (method, slice)."""

    path: Path
    study_id: str
    methods: tuple[str, ...]
    trials: dict[str, tuple[str, int]]


@dataclass(frozen=True)
class Rating:
    rater: str
    trial: str
    method: str
    slice: int
    values: dict[str, int | None]  # criterion -> 1..6, None where the rater left it blank


@dataclass(frozen=True)
class PairTest:
    criterion: str
    method_a: str
    method_b: str
    n_a: int
    n_b: int
    u: float | None  # Mann-Whitney U of A
    p_rank_sum: float | None
    r_rank_sum: float | None
    n_pairs: int
    n_nonzero: int
    w: float | None  # scipy's signed-rank statistic: the smaller of R+ and R-
    p_signed_rank: float | None
    r_signed_rank: float | None


def read_key(path: str | os.PathLike) -> StudyKey:
    """Load ``key.json``; InputError naming it if it is missing or not a study key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "key file not found" if not path.exists() else "not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"not a JSON study key ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
        raise InputError(path, "not a key written by `microsr-tf rating-study make`")
    try:
        methods = tuple(str(m) for m in data["methods"])
        trials = {str(t["trial"]): (str(t["method"]), int(t["slice"])) for t in data["trials"]}
        study_id = str(data["study_id"])
    except (KeyError, TypeError, ValueError):
        raise InputError(path, "study key lacks its methods, trials or study id") from None
    if not methods or not trials or any(m not in methods for m, _ in trials.values()):
        raise InputError(path, "study key is inconsistent: trials name methods it does not list")
    return StudyKey(path, study_id, methods, trials)


def _rating_value(text: str, column: str, where: str, path: Path) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise InputError(path, f"{where}: {column} rating {text!r} is not a whole number "
                               f"{SCALE[0]}-{SCALE[1]}") from None
    if not SCALE[0] <= value <= SCALE[1]:
        raise InputError(path, f"{where}: {column} rating {value} is outside {SCALE[0]}-{SCALE[1]}")
    return value


def read_ratings(paths: Sequence[str | os.PathLike], key: StudyKey) -> list[Rating]:
    """Every rating of every CSV, unblinded with ``key``; InputError naming the CSV at the first problem.

    Refused: a missing, empty, non-UTF-8 or malformed file, missing columns, a row of the wrong
    length, a CSV of another study, an unknown trial, a rating outside 1-6, an empty rater name,
    the same rater rating a trial twice (also across files), and a file without any rating.
    """
    if not paths:
        raise InputError(None, "give at least one ratings CSV")
    seen: dict[tuple[str, str], str] = {}
    ratings: list[Rating] = []
    for raw_path in paths:
        path = Path(raw_path)
        if not path.is_file():
            raise InputError(path, "ratings file not found" if not path.exists() else "not a file")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(path, "not UTF-8 text; expected a CSV exported by the rating page") from None
        if "\x00" in text:
            raise InputError(path, "contains NUL bytes; not a CSV exported by the rating page")
        try:
            rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
        except csv.Error as exc:
            raise InputError(path, f"malformed CSV ({exc})") from None
        rows = [(i, row) for i, row in enumerate(rows, start=1) if row]
        if not rows:
            raise InputError(path, "empty file; expected a CSV exported by the rating page")
        header = [h.strip() for h in rows[0][1]]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise InputError(path, f"not a rating-study CSV: missing column(s) {', '.join(missing)}")
        col = {name: header.index(name) for name in CSV_COLUMNS}
        n_before = len(ratings)
        for line, row in rows[1:]:
            where = f"line {line}"
            if len(row) != len(header):
                raise InputError(path, f"{where}: {len(row)} fields, but the header has {len(header)}")
            study_id = row[col["study_id"]].strip()
            if study_id != key.study_id:
                raise InputError(path, f"{where}: ratings of study {study_id!r}, but {key.path} is the key of "
                                       f"study {key.study_id!r}")
            rater = row[col["rater"]].strip()
            if not rater:
                raise InputError(path, f"{where}: empty rater name")
            trial = row[col["trial"]].strip()
            if trial not in key.trials:
                raise InputError(path, f"{where}: trial {trial!r} is not part of study {key.study_id}")
            if (rater, trial) in seen:
                raise InputError(path, f"{where}: rater {rater!r} rated trial {trial} already ({seen[rater, trial]})")
            seen[rater, trial] = f"{path} {where}"
            values = {c: _rating_value(row[col[c]], c, where, path) for c in CRITERION_KEYS}
            method, slice_index = key.trials[trial]
            ratings.append(Rating(rater, trial, method, slice_index, values))
        if len(ratings) == n_before:
            raise InputError(path, "holds no ratings")
        if all(v is None for r in ratings[n_before:] for v in r.values.values()):
            raise InputError(path, "holds no scores: every criterion of every row is empty")
    return ratings


def rank_sum(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Two-sided Wilcoxon rank-sum test: Mann-Whitney U of ``a``, its p-value, and the rank-biserial
    correlation ``2 U / (n_a n_b) - 1``."""
    res = stats.mannwhitneyu(a, b, alternative="two-sided")
    u = float(res.statistic)
    return u, float(res.pvalue), 2.0 * u / (len(a) * len(b)) - 1.0


def matched_rank_biserial(d: Sequence[float]) -> float | None:
    """``(R+ - R-) / (R+ + R-)`` over the ranks of the non-zero ``|d|``; None when every ``d`` is zero."""
    d = np.asarray(d, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return None
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def compare(ratings: Sequence[Rating], methods: Sequence[str]) -> list[PairTest]:
    """Rank-sum and signed-rank tests for every criterion and pair of methods (key order)."""
    out = []
    for criterion in CRITERION_KEYS:
        by_unit: dict[str, dict[tuple[str, int], int]] = {m: {} for m in methods}
        for r in ratings:
            if r.values[criterion] is not None:
                by_unit[r.method][r.rater, r.slice] = r.values[criterion]
        for a, b in itertools.combinations(methods, 2):
            xa, xb = list(by_unit[a].values()), list(by_unit[b].values())
            u = p_rs = r_rs = None
            if xa and xb:
                u, p_rs, r_rs = rank_sum(xa, xb)
            units = sorted(set(by_unit[a]) & set(by_unit[b]))
            d = np.array([by_unit[a][k] - by_unit[b][k] for k in units], dtype=np.float64)
            n_nonzero = int(np.count_nonzero(d))
            w = p_sr = None
            if n_nonzero:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on tiny samples
                    res = stats.wilcoxon([by_unit[a][k] for k in units], [by_unit[b][k] for k in units],
                                         alternative="two-sided")
                w, p_sr = float(res.statistic), float(res.pvalue)
            out.append(PairTest(criterion, a, b, len(xa), len(xb), u, p_rs, r_rs, len(units), n_nonzero, w, p_sr,
                                matched_rank_biserial(d)))
    return out


def summarize(ratings: Sequence[Rating], methods: Sequence[str]) -> list[dict]:
    """Per criterion and method: n, median, mean, quartiles of the ratings."""
    rows = []
    for criterion in CRITERION_KEYS:
        for m in methods:
            x = np.array([r.values[criterion] for r in ratings if r.method == m and r.values[criterion] is not None],
                         dtype=np.float64)
            q1, med, q3 = np.percentile(x, [25, 50, 75]) if x.size else (np.nan,) * 3
            rows.append({"criterion": criterion, "method": m, "n": int(x.size), "median": float(med),
                         "mean": float(x.mean()) if x.size else float("nan"), "q1": float(q1), "q3": float(q3)})
    return rows


def boxplot_png(ratings: Sequence[Rating], methods: Sequence[str], study_id: str, seed: int = 0) -> bytes:
    """One panel per criterion, one box per method (whiskers 1.5 IQR), every rating jittered on top."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(1, len(CRITERION_KEYS), figsize=(4.2 + 1.3 * len(methods), 4.2), sharey=True)
    for ax, criterion in zip(np.atleast_1d(axes), CRITERION_KEYS):
        data = [[r.values[criterion] for r in ratings if r.method == m and r.values[criterion] is not None]
                for m in methods]
        ax.boxplot([d if d else [np.nan] for d in data], widths=0.55, medianprops={"color": "#d62728", "lw": 2},
                   tick_labels=[f"{m}\n(n={len(d)})" for m, d in zip(methods, data)], showfliers=False)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.18, 0.18, len(d)), np.asarray(d) + rng.uniform(-0.12, 0.12, len(d)),
                       s=10, alpha=0.45, color="#1f77b4", zorder=3)
        ax.set_title(CRITERION_LABELS[criterion])
        ax.set_ylim(SCALE[0] - 0.5, SCALE[1] + 0.5)
        ax.set_yticks(range(SCALE[0], SCALE[1] + 1))
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel(f"stars ({SCALE[0]} poor - {SCALE[1]} excellent)")
    raters = len({r.rater for r in ratings})
    fig.suptitle(f"Rating study {study_id}: {len(ratings)} rated trials, {raters} rater(s)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _num(value: float | None, decimals: int = 3) -> str:
    """Fixed decimals; ``n/a`` for a missing value."""
    return "n/a" if value is None or np.isnan(value) else f"{value:.{decimals}f}"


def _p(value: float | None) -> str:
    """A p-value with three significant digits."""
    return "n/a" if value is None or np.isnan(value) else f"{value:.3g}"


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in row]
                      for row in rows])
    return buf.getvalue()


def markdown(key: StudyKey, csv_paths: Sequence[str | os.PathLike], ratings: Sequence[Rating],
             summary: Sequence[dict], tests: Sequence[PairTest]) -> str:
    raters: dict[str, int] = {}
    for r in ratings:
        raters[r.rater] = raters.get(r.rater, 0) + 1
    lines = [
        f"# Rating study {key.study_id}: results",
        "",
        f"{len(ratings)} rated trial(s) from {len(raters)} rater(s) "
        f"({', '.join(f'{name}: {n}' for name, n in sorted(raters.items()))}), read from "
        f"{', '.join(f'`{Path(p).name}`' for p in csv_paths)}; key `{key.path.name}` "
        f"({len(key.trials)} trials, methods {', '.join(key.methods)}).",
        f"Scale: {SCALE[0]} (poor) to {SCALE[1]} (excellent) stars.",
        "",
        "![Ratings per method and criterion](boxplots.png)",
        "",
        "## Ratings per method",
        "",
        "| criterion | method | n | median | mean | quartiles |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in summary:
        quartiles = f"{_num(row['q1'], 2)}-{_num(row['q3'], 2)}" if row["n"] else "n/a"
        lines.append(f"| {CRITERION_LABELS[row['criterion']]} | {row['method']} | {row['n']} | "
                     f"{_num(row['median'], 2)} | {_num(row['mean'], 2)} | {quartiles} |")
    lines += [
        "",
        "## Pairwise tests",
        "",
        "Rank-sum: the paper's Wilcoxon rank-sum test of all ratings of A against all ratings of B "
        "(`scipy.stats.mannwhitneyu`, two-sided, tie-corrected); effect size r = rank-biserial correlation "
        "2U/(n_A n_B) - 1, the chance that a rating of A beats one of B minus the reverse.",
        "Signed-rank: Wilcoxon signed-rank test on the pairs of ratings the same rater gave A and B for "
        "the same slice (`scipy.stats.wilcoxon`, two-sided, tied pairs dropped); effect size r = matched-pairs "
        "rank-biserial correlation (R+ - R-)/(R+ + R-). Positive r: A rated higher. Both in [-1, 1].",
        f"p-values are not adjusted for the {len(tests)} comparisons per test (Bonferroni: compare each with "
        f"{_p(0.05 / max(1, len(tests)))} for a family-wise 5%).",
        "",
        "| criterion | A | B | n A | n B | U | p rank-sum | r rank-sum | pairs (non-tied) | W | p signed-rank | "
        "r signed-rank |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tests:
        lines.append(f"| {CRITERION_LABELS[t.criterion]} | {t.method_a} | {t.method_b} | {t.n_a} | {t.n_b} | "
                     f"{_num(t.u, 1)} | {_p(t.p_rank_sum)} | {_num(t.r_rank_sum)} | {t.n_pairs} ({t.n_nonzero}) | "
                     f"{_num(t.w, 1)} | {_p(t.p_signed_rank)} | {_num(t.r_signed_rank)} |")
    if not tests:
        lines.append("| (one method: nothing to compare) |||||||||||| ")
    return "\n".join(lines) + "\n"


def _publish(out: Path, contents: dict[str, bytes]) -> dict[str, Path]:
    """Write every file to a hidden temporary in ``out`` first, then rename them all into place together
    (:func:`~microsr_tf.files.replace_together`), so a failure or Ctrl-C while writing leaves the earlier
    outputs untouched and no partial file at a final path."""
    for name in contents:
        if (out / name).is_dir():
            raise InputError(out / name, "is a folder where this report file goes; move it or choose another --out")
    temps: dict[str, Path] = {}
    try:
        for name, data in contents.items():
            fd, temps[name] = temp_file_beside(out / name)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        replace_together((tmp, out / name) for name, tmp in temps.items())
    finally:
        remove_quietly(*temps.values())
    return {name: out / name for name in contents}


def make_report(csv_paths: Sequence[str | os.PathLike], key_path: str | os.PathLike,
                out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """Read, check and unblind the CSVs, then write ``report.md``, ``summary.csv``, ``pairwise.csv``
    and ``boxplots.png`` to ``out_dir``. Every input is checked before anything is written; an earlier
    report there is replaced only with ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory; choose an output folder")
    if not overwrite and any((out / name).exists() for name in REPORT_FILES):
        raise InputError(out, "holds a report already; pass --overwrite to replace it or choose another --out")
    key = read_key(key_path)
    ratings = read_ratings(csv_paths, key)
    summary = summarize(ratings, key.methods)
    tests = compare(ratings, key.methods)
    contents: dict[str, bytes] = {  # REPORT_FILES
        "report.md": markdown(key, csv_paths, ratings, summary, tests).encode(),
        "summary.csv": _csv_text(["criterion", "method", "n", "median", "mean", "q1", "q3"],
                                 [[r[k] for k in ("criterion", "method", "n", "median", "mean", "q1", "q3")]
                                  for r in summary]).encode(),
        "pairwise.csv": _csv_text(
            ["criterion", "method_a", "method_b", "n_a", "n_b", "u", "p_rank_sum", "r_rank_biserial", "n_pairs",
             "n_pairs_nonzero", "w", "p_signed_rank", "r_matched_rank_biserial"],
            [[t.criterion, t.method_a, t.method_b, t.n_a, t.n_b, t.u, t.p_rank_sum, t.r_rank_sum, t.n_pairs,
              t.n_nonzero, t.w, t.p_signed_rank, t.r_signed_rank] for t in tests]).encode(),
        "boxplots.png": boxplot_png(ratings, key.methods, key.study_id),
    }
    return _publish(make_output_dir(out), contents)
