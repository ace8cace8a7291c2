"""Tests for promptseg.validation: deployed metrics of hand-made per-pair outputs, and of a
trained model on the real tune split."""

from __future__ import annotations

import numpy as np
import pytest

from promptseg.data.bank import ABSENT, PRESENT, UNKNOWN, Bank
from promptseg.prompts import TARGETS
from promptseg.validation import pair_outputs, score_pairs

LIVER, GLIOMA, TUMOUR = (TARGETS.index(t) for t in ("liver", "glioma", "liver tumour"))


@pytest.fixture
def hand_made() -> tuple[Bank, dict[str, np.ndarray]]:
    """Rows 0-4: one CHAOS volume (liver on slices 0-1, absent on 2-3, too small to count on 4);
    rows 5-6: two brain slices (glioma on 5, absent on 6). Liver tumour is never annotated."""
    bank = Bank(8)
    n = 7
    bank.image_dataset = ["chaos-mr"] * 5 + ["brain-tumor"] * 2
    bank.image_case = ["chaos/1"] * 5 + ["brain/7", "brain/8"]
    bank.state = np.full((n, len(TARGETS)), UNKNOWN, np.int8)
    bank.state[[0, 1], LIVER] = PRESENT
    bank.state[[2, 3], LIVER] = ABSENT
    bank.state[0:5, GLIOMA] = ABSENT  # cross domain
    bank.state[5, GLIOMA], bank.state[6, GLIOMA] = PRESENT, ABSENT
    bank.state[[5, 6], LIVER] = ABSENT  # cross domain
    out = {k: np.zeros((n, len(TARGETS))) for k in ("prob", "pred", "inter", "truth")}

    def put(row: int, column: int, prob: float, pred: int, inter: int = 0, truth: int = 0):
        for key, value in zip(("prob", "pred", "inter", "truth"), (prob, pred, inter, truth)):
            out[key][row, column] = value

    put(0, LIVER, 0.9, 10, 8, 10)
    put(1, LIVER, 0.9, 10, 10, 10)
    put(2, LIVER, 0.8, 5)  # a false positive on a slice without liver
    put(3, LIVER, 0.2, 4)  # one the gate removes
    put(4, LIVER, 0.9, 7)  # UNKNOWN: counted nowhere
    put(0, GLIOMA, 0.1, 3)  # gated: answered empty
    put(5, GLIOMA, 0.7, 20, 15, 20)
    put(6, GLIOMA, 0.6, 6)
    put(0, TUMOUR, 0.9, 50)  # UNKNOWN target: counted nowhere
    return bank, out


def test_gate_and_3d_dice_with_false_positives_on_absent_slices(hand_made):
    bank, out = hand_made
    m = score_pairs(bank, out, 0.5)
    # CHAOS liver, one volume: kept slices 0-2: 2 * 18 / (25 + 20).
    assert m["dice"]["chaos-mr/liver"] == pytest.approx(36 / 45)
    assert m["dice"]["brain-tumor/glioma"] == pytest.approx(30 / 40)  # per positive slice
    assert set(m["dice"]) == {"chaos-mr/liver", "brain-tumor/glioma"}
    assert m["mean_dice"] == pytest.approx((36 / 45 + 0.75) / 2)
    # Absent pairs: liver 2-3 (same), glioma 0-4 (cross), glioma 6 (same), liver 5-6 (cross).
    # Not empty at 0.5: liver 2, glioma 6. The gated glioma on slice 0 counts as empty.
    assert m["empty_rate"] == pytest.approx(8 / 10)
    assert m["empty_same_domain"] == pytest.approx(1 / 3)
    assert m["empty_cross_domain"] == 1.0


def test_ungated_and_per_target_thresholds(hand_made):
    bank, out = hand_made
    ungated = score_pairs(bank, out, 0.0)
    assert ungated["dice"]["chaos-mr/liver"] == pytest.approx(36 / 49)  # slice 3 counts too
    assert ungated["empty_rate"] == pytest.approx(6 / 10)  # liver 2, 3, glioma 0, 6 not empty
    assert ungated["empty_cross_domain"] == pytest.approx(6 / 7)

    tau = np.full(len(TARGETS), 0.5)
    tau[LIVER], tau[GLIOMA] = 0.85, 0.65
    m = score_pairs(bank, out, tau)
    assert m["dice"]["chaos-mr/liver"] == pytest.approx(36 / 40)  # the false positive is gated
    assert m["dice"]["brain-tumor/glioma"] == pytest.approx(0.75)
    assert m["empty_rate"] == 1.0 and m["empty_same_domain"] == 1.0

    tau[GLIOMA] = 0.75  # the true glioma is gated too: Dice 0 on that slice
    assert score_pairs(bank, out, tau)["dice"]["brain-tumor/glioma"] == 0.0


def test_a_bank_without_absent_pairs_reports_full_empty_rates(hand_made):
    bank, out = hand_made
    bank.state[bank.state == ABSENT] = UNKNOWN
    m = score_pairs(bank, out, 0.5)
    assert m["empty_rate"] == m["empty_same_domain"] == m["empty_cross_domain"] == 1.0


@pytest.mark.slow
def test_pair_outputs_of_a_trained_model_on_the_real_tune_split(trained_run, train_run, data_root):
    import torch

    from promptseg.checkpoint import load_checkpoint

    loaded = load_checkpoint(trained_run / "best.pt")
    bank = train_run.bank(data_root, ["chaos-mr"], "tune", loaded.preprocessing)
    torch.set_num_threads(1)
    out = pair_outputs(loaded.model, bank, loaded.prompt_embeddings, loaded.vocabulary)
    known = bank.state != UNKNOWN
    for key in ("prob", "pred", "inter", "truth"):
        assert out[key].shape == bank.state.shape
        assert (out[key][~known] == 0).all(), key
    assert ((out["prob"] > 0) & (out["prob"] < 1))[known].all()
    assert (out["inter"] <= np.minimum(out["pred"], out["truth"])).all()
    truth = np.zeros(bank.state.shape)
    rows, cols = np.nonzero(bank.mask_index >= 0)
    truth[rows, cols] = bank.masks[bank.mask_index[rows, cols]].sum(axis=(1, 2))
    np.testing.assert_array_equal(out["truth"], truth)
    assert out["pred"].sum() > 0
