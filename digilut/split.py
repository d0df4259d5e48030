"""Patient-level train/test split, negative undersampling and cross-validation folds.

Everything is grouped by patient (a patient's two slides never straddle a split or a fold) and
deterministic per seed. The split is stratified by whether a patient has any lesion; the folds deal
patients with lesions first, balancing positive patches (:func:`assign_folds`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from digilut.errors import ConfigError, DigilutError

log = logging.getLogger(__name__)


class SplitError(DigilutError, ValueError):
    """The data cannot be split as asked (too few patients for the folds, no labels)."""


@dataclass(frozen=True)
class SplitConfig:
    test_fraction: float = 0.25
    folds: int = 3
    neg_per_pos: float = 3.0  # negatives kept per positive in training (undersampling); 0 = keep all
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction={self.test_fraction} must be in [0, 1)")
        if not 2 <= self.folds <= 20:
            raise ConfigError(f"folds={self.folds} must be in 2..20")
        if self.neg_per_pos < 0:
            raise ConfigError(f"neg_per_pos={self.neg_per_pos} must be ≥ 0 (0 keeps every negative)")


def split_patients(patients: pd.DataFrame, test_fraction: float, seed: int) -> set[str]:
    """Choose test patients, stratified by ``positive`` (a patient with any lesion).

    ``patients`` has columns ``patient, positive``. Each stratum gives ``round(fraction × size)``
    patients to the test side; at least one patient stays on each side when there are two or more.
    """
    rng = np.random.default_rng([seed, 11])
    test: set[str] = set()
    for _, group in patients.sort_values("patient").groupby("positive"):
        names = group["patient"].to_numpy()
        k = round(test_fraction * len(names))
        test.update(rng.permutation(names)[:k].tolist())
    all_p = sorted(patients["patient"])
    if test_fraction > 0 and not test and len(all_p) >= 2:
        test.add(str(rng.choice(all_p)))
    if len(test) == len(all_p) and len(all_p) >= 2:
        test.discard(sorted(test)[0])
    return test


def assign_folds(train: pd.DataFrame, folds: int, seed: int) -> dict[str, int]:
    """Fold of each training patient, stratified by patient.

    Patients with lesions are dealt first, in a seeded random order, each to the fold holding the
    fewest positive patches so far (ties: fewest patients, then the lower fold); then the others,
    each to the fold with the fewest patches. So every fold gets a patient with lesions whenever
    there are at least ``folds`` of them — patch-level ``StratifiedGroupKFold`` can put both of two
    such patients in one fold, leaving another fold to train on a single class.
    """
    per_patient = train.groupby("patient", observed=True)["label"].agg(["sum", "size"])
    if len(per_patient) < folds:
        raise SplitError(
            f"{len(per_patient)} training patient(s) cannot fill {folds} folds; lower --folds or add patients"
        )
    order = np.random.default_rng([seed, 7]).permutation(len(per_patient))
    per_patient = per_patient.iloc[order]
    positives, patches, members = np.zeros(folds), np.zeros(folds), np.zeros(folds)
    fold_of: dict[str, int] = {}
    for with_lesions in (True, False):
        chosen = per_patient[(per_patient["sum"] > 0) == with_lesions]
        for patient, (n_pos, n) in zip(chosen.index, chosen.to_numpy(), strict=True):
            key = positives if with_lesions else patches
            k = int(np.lexsort((np.arange(folds), members, key))[0])
            fold_of[str(patient)] = k
            positives[k] += n_pos
            patches[k] += n
            members[k] += 1
    return fold_of


def undersample(df: pd.DataFrame, neg_per_pos: float, seed: int) -> np.ndarray:
    """Boolean mask keeping every positive and ``neg_per_pos`` negatives per positive, per fold.

    Negatives are drawn uniformly within each fold so every fold keeps the same ratio. With
    ``neg_per_pos=0`` or no positives in a fold, every row is kept.
    """
    keep = np.ones(len(df), dtype=bool)
    if neg_per_pos <= 0:
        return keep
    rng = np.random.default_rng([seed, 13])
    labels = df["label"].to_numpy()
    for _, idx in df.groupby("fold").indices.items():
        pos = idx[labels[idx] == 1]
        neg = idx[labels[idx] == 0]
        n_keep = round(neg_per_pos * len(pos))
        if len(pos) == 0 or n_keep >= len(neg):
            continue
        drop = rng.permutation(neg)[n_keep:]
        keep[drop] = False
    return keep


def _check_folds_train_on_both_classes(train: pd.DataFrame, folds: int) -> None:
    """Fail here, not in training: a fold whose training rows (the other folds) lack a class."""
    for k in range(folds):
        rows = train[train["fold"] != k]
        if rows["label"].nunique() < 2:
            missing = "lesion" if rows["label"].max() == 0 else "lesion-free"
            positive = train.groupby("patient", observed=True)["label"].max()
            raise SplitError(
                f"fold {k}: its training patients hold no {missing} patch "
                f"({int(positive.sum())} of {len(positive)} training patients have lesions, {folds} folds): "
                "add patients with lesions, lower folds or test_fraction"
            )


def split_dataset(manifest: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Return ``manifest`` with ``split`` (train/test), ``fold`` (-1 for test) and ``sampled``.

    ``sampled`` marks the training rows kept by undersampling; test rows are all ``True``.
    """
    if "label" not in manifest.columns:
        raise SplitError("manifest has no label column: run the label step (digilut prepare with train.csv)")
    if manifest.empty:
        raise SplitError("manifest has no patches to split")
    patients = manifest.groupby("patient", observed=True)["label"].max().rename("positive").reset_index()
    test = split_patients(patients, cfg.test_fraction, cfg.seed)
    out = manifest.copy()
    is_test = out["patient"].isin(test).to_numpy()
    out["split"] = np.where(is_test, "test", "train")
    fold_of = assign_folds(out[~is_test], cfg.folds, cfg.seed)
    out["fold"] = out["patient"].map(fold_of).fillna(-1).astype(np.int8)
    sampled = np.ones(len(out), dtype=bool)
    train_idx = np.flatnonzero(~is_test)
    sampled[train_idx] = undersample(out.iloc[train_idx], cfg.neg_per_pos, cfg.seed)
    out["sampled"] = sampled
    check_split(out)
    tr = out[~is_test]
    _check_folds_train_on_both_classes(tr, cfg.folds)
    log.info(
        "split: %d test / %d train patients in %d folds; train patches %d → %d after undersampling "
        "(%d positive)",
        len(test),
        tr["patient"].nunique(),
        cfg.folds,
        len(tr),
        int(tr["sampled"].sum()),
        int(tr.loc[tr["sampled"], "label"].sum()),
    )
    return out


def check_split(df: pd.DataFrame) -> None:
    """Raise :class:`SplitError` if any patient is on both sides of the split or in two folds."""
    sides = df.groupby("patient", observed=True)["split"].nunique()
    bad = sides[sides > 1]
    if len(bad):
        raise SplitError(f"patient(s) {', '.join(map(str, bad.index[:5]))} on both sides of the split")
    folds = df[df["split"] == "train"].groupby("patient", observed=True)["fold"].nunique()
    bad = folds[folds > 1]
    if len(bad):
        raise SplitError(f"patient(s) {', '.join(map(str, bad.index[:5]))} in more than one fold")
