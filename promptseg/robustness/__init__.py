"""``promptseg robustness``: how a checkpoint answers prompts it was not trained on.

Four measurements on the validation splits (``promptseg/data/partition.json``), all with the case
rule of ``promptseg evaluate`` (a CHAOS or LiTS volume is one case, scored in 3D on its native
grid; a brain tumour or BTCV slice is one case, scored in 2D) and its :class:`Predictor`.
Masks are what ``promptseg-run`` delivers by default: each prompt's slices gated with its
target's calibrated presence threshold, then the largest 3D component of organ masks in volumes
(``--no-presence-gate`` and ``--postprocess none`` score the network's raw masks instead):

1. **Phrasing.** Every present target of every case is prompted with its canonical phrasing
   (``"Segment the {target}"``), with ``phrasings`` distinct training phrasings and with
   ``phrasings`` distinct held-out phrasings (drawn per case and target by
   :class:`promptseg.evaluate._Prompting`, seeds ``seed``, ``seed + 1``, ...). Dice per target
   per set, and the paired difference to the canonical prompt on the same case. Held-out
   phrasings are also grouped by what is new in them: the synonym, the template, or both.
2. **Wrong target.** The canonical prompt of every target a case annotates, scored per slice
   where that target's truth is empty: "answered empty" when no pixel is predicted on the
   slice. Same-domain (spleen on a slice without spleen, meningioma on a glioma slice) and
   cross-domain (brain tumour prompts on abdominal slices, abdominal prompts on brain slices)
   per prompt target. The domains are :data:`promptseg.data.bank.DOMAIN`.
3. **Left/right kidney.** On CHAOS and BTCV, the canonical left- and right-kidney prompts on
   every case: the fractions of all predicted voxels (pooled over the split) inside the
   left-kidney truth, inside the right-kidney truth and elsewhere (each row sums to 1), and the
   Dice of each prompt against each side (mean over the cases where that side is present).
4. **Free-form.** Clinical phrasings from a JSON file (default: the packaged
   ``promptseg/data/free_form.json``; ``--free-form FILE`` for another):
   Dice on their target where it is present; off-topic prompts: the per-slice empty rate over
   every validation slice. For each, whether the runtime's prompt resolver
   (:mod:`promptseg.runtime.prompt_resolver`, the packaged engine's calibrated cosine
   threshold) would refuse it. Masks here come from the PyTorch path for every prompt, refused
   or not; off-topic prompts have no target, so they are scored ungated.

Outputs: ``results.json`` (everything), ``cases.csv`` (one row per scored case and prompt;
BTCV and LiTS rows go to ``btcv-ct/cases.csv`` and ``lits-ct/cases.csv``, kept local),
``report.md`` (generated tables only) and ``kidney_confusion.png``. No image pixels are written.

Modules: :mod:`.free_form` (the prompt file), :mod:`.phrasings` (which phrasings are drawn),
:mod:`.tally` (scores gathered per case), :mod:`.refusal` (the runtime resolver's verdicts),
:mod:`.summary` (the results dict), :mod:`.report` and :mod:`.figure` (the files written) and
:mod:`.run` (the command).
"""

from __future__ import annotations

from promptseg.robustness.figure import confusion_png
from promptseg.robustness.free_form import DEFAULT_FREE_FORM, FreeForm, load_free_form
from promptseg.robustness.phrasings import draw_phrasings, heldout_kind, known_phrasing
from promptseg.robustness.refusal import refusal_verdicts
from promptseg.robustness.report import report_markdown, write_outputs
from promptseg.robustness.run import PROMPT_CHUNK, main_args, robustness, robustness_command
from promptseg.robustness.summary import summarise
from promptseg.robustness.tally import (
    KIDNEY_DATASETS,
    KIDNEYS,
    SETS,
    _Tally,
    kidney_confusion_row,
)

__all__ = [
    "DEFAULT_FREE_FORM",
    "KIDNEY_DATASETS",
    "KIDNEYS",
    "PROMPT_CHUNK",
    "SETS",
    "FreeForm",
    "_Tally",
    "confusion_png",
    "draw_phrasings",
    "heldout_kind",
    "kidney_confusion_row",
    "known_phrasing",
    "load_free_form",
    "main_args",
    "refusal_verdicts",
    "report_markdown",
    "robustness",
    "robustness_command",
    "summarise",
    "write_outputs",
]
