import numpy as np
import pandas as pd
import pytest

from digilut.split import SplitConfig, SplitError, assign_folds, check_split, split_dataset, undersample


def fake_manifest(n_patients=12, per_slide=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        positive = p % 3 != 0
        for s in "ab":
            for i in range(per_slide):
                rows.append((f"P{p:02d}_{s}.tif", f"P{p:02d}", i, int(positive and rng.random() < 0.15)))
    return pd.DataFrame(rows, columns=["slide", "patient", "x0", "label"])


@pytest.mark.parametrize("seed", range(5))
def test_no_patient_on_both_sides_or_in_two_folds(seed):
    out = split_dataset(fake_manifest(seed=seed), SplitConfig(folds=3, seed=seed))
    assert out.groupby("patient").split.nunique().max() == 1
    assert out[out.split == "train"].groupby("patient").fold.nunique().max() == 1
    assert (out[out.split == "test"].fold == -1).all()
    assert set(out[out.split == "train"].fold) == {0, 1, 2}
    test_pat = out[out.split == "test"].patient.unique()
    assert len(test_pat) == 3  # round(0.25 × 4 negative) + round(0.25 × 8 positive)


def test_deterministic_per_seed():
    a = split_dataset(fake_manifest(), SplitConfig(seed=3))
    b = split_dataset(fake_manifest(), SplitConfig(seed=3))
    c = split_dataset(fake_manifest(), SplitConfig(seed=4))
    assert a.equals(b)
    assert not a[["split", "fold"]].equals(c[["split", "fold"]])


def test_undersampling_keeps_every_positive_and_the_ratio_per_fold():
    out = split_dataset(fake_manifest(), SplitConfig(neg_per_pos=2.0))
    tr = out[out.split == "train"]
    assert tr[tr.label == 1].sampled.all()
    for _, g in tr[tr.sampled].groupby("fold"):
        assert (g.label == 0).sum() == round(2.0 * (g.label == 1).sum())
    assert out[out.split == "test"].sampled.all()
    assert undersample(tr, 0, 0).all()


def test_too_few_patients_for_the_folds_is_a_clear_error():
    with pytest.raises(SplitError, match="cannot fill 5 folds"):
        split_dataset(fake_manifest(n_patients=4), SplitConfig(folds=5))


@pytest.mark.parametrize("seed", range(20))
def test_every_fold_gets_a_patient_with_lesions_when_there_are_enough(seed):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(7):  # 3 patients with lesions (very unequal amounts), 4 without
        n_pos = [40, 3, 1][p] if p < 3 else 0
        n = int(rng.integers(50, 200))
        rows += [(f"P{p}", int(i < n_pos)) for i in range(n)]
    df = pd.DataFrame(rows, columns=["patient", "label"])
    fold_of = assign_folds(df, 3, seed)
    assert sorted(fold_of) == [f"P{p}" for p in range(7)]
    assert sorted(fold_of[f"P{p}"] for p in range(3)) == [0, 1, 2]  # one patient with lesions each
    sizes = df.groupby(df.patient.map(fold_of)).size()
    assert len(sizes) == 3 and sizes.max() < 3 * sizes.min()  # negatives fill the folds evenly


def test_a_fold_that_would_train_on_one_class_fails_at_the_split():
    df = fake_manifest(n_patients=6)
    df.loc[~df.patient.isin(["P01"]), "label"] = 0  # one patient with lesions, 2 folds
    df.loc[df.patient == "P01", "label"] = 1
    with pytest.raises(SplitError, match=r"fold \d: its training patients hold no lesion patch \(1 of 5"):
        split_dataset(df, SplitConfig(folds=2, test_fraction=0.2))


def test_check_split_catches_a_patient_on_both_sides():
    df = pd.DataFrame({"patient": ["a", "a"], "split": ["train", "test"], "fold": [0, -1]})
    with pytest.raises(SplitError, match="a on both sides"):
        check_split(df)


def test_tiny_real_manifest_splits(tiny_prepared):
    from digilut.manifest import read_manifest

    rows = read_manifest(tiny_prepared[0], require=("label",))
    out = split_dataset(rows, SplitConfig(folds=2))
    assert len(out) == len(rows) and out[["slide", "x0", "y0"]].equals(rows[["slide", "x0", "y0"]])
    check_split(out)
    by_patient = out.groupby("patient")
    assert (by_patient.split.nunique() == 1).all() and (by_patient.fold.nunique() == 1).all()  # both slides
    train = out[out.split == "train"]
    assert set(train.fold) == {0, 1} and (out[out.split == "test"].fold == -1).all()
    for k in (0, 1):  # each fold trains on patients with lesions
        assert train[(train.fold != k) & train.sampled].label.sum() > 0
