"""Deployed-behaviour metrics at model resolution, used to pick checkpoints during training.

Every known (image, target) pair of a bank is segmented with the canonical prompt; a slice's
mask is kept only where sigmoid(presence) >= ``tau``. Volumes (CHAOS, LiTS) are scored by 3D
Dice per case, so false positives on slices without the organ count; slice datasets (brain,
BTCV) by Dice per positive slice. Absent-target pairs count as answered empty when the kept
mask is empty.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from promptseg.data.bank import ABSENT, DOMAIN, PRESENT, UNKNOWN, Bank
from promptseg.model.unet import PromptSegModel
from promptseg.prompts import TARGETS, PromptVocabulary

VOLUME_DATASETS = ("chaos-mr", "lits-ct")


@torch.no_grad()
def pair_outputs(
    model: PromptSegModel,
    bank: Bank,
    embeddings: dict[str, torch.Tensor],
    vocab: PromptVocabulary,
    batch: int = 32,
) -> dict[str, np.ndarray]:
    """Per (image, target) arrays (N, T): presence probability, predicted mask voxels,
    intersection with the truth and truth voxels (the ungated mask: logits > 0)."""
    model.eval()
    n, t = bank.state.shape
    out = {k: np.zeros((n, t), np.float64) for k in ("prob", "pred", "inter", "truth")}
    device = next(model.parameters()).device
    canonical = torch.stack([embeddings[vocab.canonical(x)] for x in TARGETS])
    films = model.film(canonical.to(device))
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        images = torch.from_numpy(bank.images[start:stop])[:, None].to(device)
        skips = model.unet.encode(images)
        for j in range(t):
            rows = np.nonzero(bank.state[start:stop, j] != UNKNOWN)[0]
            if not len(rows):
                continue
            sel = torch.from_numpy(rows).to(device)
            film = films[j : j + 1].expand(len(rows), -1)
            fused = model.unet.fuse(skips[-1][sel], film)
            prob = torch.sigmoid(model.unet.presence(fused)[:, 0]).cpu().numpy()
            pred = (model.unet.decode(fused, [s[sel] for s in skips], film)[:, 0] > 0).cpu().numpy()
            for r, p, m in zip(rows, prob, pred):
                i = start + r
                out["prob"][i, j] = p
                out["pred"][i, j] = m.sum()
                k = bank.mask_index[i, j]
                if k >= 0:
                    truth = bank.masks[k]
                    out["truth"][i, j] = truth.sum()
                    out["inter"][i, j] = np.logical_and(m, truth).sum()
    return out


def score_pairs(bank: Bank, out: dict[str, np.ndarray], tau: float | np.ndarray) -> dict:
    """Dice per (dataset, target) and empty rates of the masks kept by the gate ``tau``
    (a scalar or one threshold per target, (T,))."""
    keep = out["prob"] >= np.broadcast_to(np.asarray(tau, np.float64), (len(TARGETS),))
    pred, inter = out["pred"] * keep, out["inter"] * keep
    datasets = np.array(bank.image_dataset)
    cases = np.array(bank.image_case)
    dice: dict[str, list[float]] = defaultdict(list)
    for ds in sorted(set(bank.image_dataset)):
        rows = datasets == ds
        for j, target in enumerate(TARGETS):
            positive = rows & (bank.state[:, j] == PRESENT)
            if not positive.any():
                continue
            if ds in VOLUME_DATASETS:
                for case in sorted(set(cases[positive])):
                    c = (cases == case) & (bank.state[:, j] != UNKNOWN)
                    denom = pred[c, j].sum() + out["truth"][c, j].sum()
                    dice[f"{ds}/{target}"].append(2 * inter[c, j].sum() / max(denom, 1.0))
            else:
                denom = pred[positive, j] + out["truth"][positive, j]
                dice[f"{ds}/{target}"].extend(2 * inter[positive, j] / np.maximum(denom, 1.0))
    per = {k: float(np.mean(v)) for k, v in dice.items()}
    absent = bank.state == ABSENT
    same = np.array([[t in DOMAIN[ds] for t in TARGETS] for ds in bank.image_dataset], bool)
    empty = pred == 0

    def rate(mask: np.ndarray) -> float:
        return float(empty[mask].mean()) if mask.any() else 1.0

    return {
        "dice": per,
        "mean_dice": float(np.mean(list(per.values()))) if per else 0.0,
        "empty_rate": rate(absent),
        "empty_same_domain": rate(absent & same),
        "empty_cross_domain": rate(absent & ~same),
    }


def deployed_metrics(
    model: PromptSegModel,
    bank: Bank,
    embeddings: dict[str, torch.Tensor],
    vocab: PromptVocabulary,
    tau: float = 0.5,
) -> dict:
    """Gated metrics at ``tau`` plus the ungated mean Dice and empty rate for comparison."""
    out = pair_outputs(model, bank, embeddings, vocab)
    gated = score_pairs(bank, out, tau)
    ungated = score_pairs(bank, out, 0.0)
    gated["ungated"] = {k: ungated[k] for k in ("mean_dice", "empty_rate")}
    return gated
