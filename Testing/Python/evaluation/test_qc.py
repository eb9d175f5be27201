"""The QC picture says when the whole chain is to be checked, and why."""
import numpy as np
from VertebraIDLib.engine.evidence import Evidence
from VertebraIDLib.engine.landmarks import Landmarks
from VertebraIDLib.engine.pipeline import UNANCHORED_REASON, locate
from VertebraIDLib.evaluation.qc import result_figure
from VertebraIDLib.synthetic.simulate import simulate_case


def _ribs_all_along(line):
    n = len(line)
    return Landmarks(np.full(n, 0.96), np.full(n, 0.04), np.ones(n), np.ones(n), np.zeros(n))


def test_the_picture_title_says_why_every_label_is_to_be_checked():
    case = simulate_case(21, spacing_mm=3.0, difficulty="clean", levels=("T3", "T11"))
    flagged = result_figure(locate(Evidence(case.heatmaps, anatomy=_ribs_all_along)), title="case")
    assert flagged._suptitle.get_text() == f"case: check every label ({UNANCHORED_REASON})"
    plain = result_figure(locate(case.heatmaps), title="case")
    assert plain._suptitle.get_text() == "case"
