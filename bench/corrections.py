"""How many corrections does a user need? Identification after 0, 1, 2, 3 corrected vertebrae.

    python bench/corrections.py --model M [--phantoms 50] [--seed 2000000] [--corrections 3]

The Slicer workflow: Detect places labelled points; the user fixes a wrong one (drags it onto
the body and renames it) and presses Re-label, which re-solves the exact optimiser with every
edited point as a hard constraint (`pipeline.solve(..., constraints)`, what the module's
Logic.relabel calls). Simulated here: each round, the user corrects the most cranial vertebra
that is not identified, placing its true label at its true centre; the others are re-solved.
A scan stops once all its vertebrae are identified. Cases: held-out phantoms (the seeds of
`network_eval.py`) and the labelled real scans of `realct.py` (a scan detect refuses counts as
nothing identified; a bone-only scan is read from its bone, as detect does), each with the model's
own engine settings. A Re-label the engine refuses
(it says so in one sentence, as Slicer shows it) leaves the labels as they were and is listed. For the real scans it also says where the first result went wrong:
how many vertebrae got a point at all (any label, mutually nearest, <= 20 mm) and by how many
levels those points' names are off.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from network_eval import predicted_phantoms
from realct import real_cases
from VertebraIDLib.engine.corrections import Constraint
from VertebraIDLib.engine.pipeline import prepare, solve
from VertebraIDLib.engine.settings import EngineSettings
from VertebraIDLib.engine.skeleton import is_bone_only, locate_in_skeleton
from VertebraIDLib.errors import VertebraIDError
from VertebraIDLib.evaluation.metrics import (
    evaluate_case,
    name_offsets,
    summarize,
)
from VertebraIDLib.io.files import write_text_atomic
from VertebraIDLib.io.images import read_image
from VertebraIDLib.networks.bundle import load_model
from VertebraIDLib.networks.predict import predict_evidence


def correction_rounds(prepared, truth, options: EngineSettings, rounds: int, vertebrae, refusals: list | None = None):
    """Evaluations after 0..rounds corrections of `vertebrae`, the automatic result (a finished
    scan repeats its last one). A Re-label the engine refuses (the user sees its sentence) leaves the
    labels as they were; its message goes to `refusals`."""
    constraints: list[Constraint] = []
    evaluations = []
    for _ in range(rounds + 1):
        evaluation = evaluate_case(vertebrae, truth)
        evaluations.append(evaluation)
        wrong = [o.label for o in evaluation.outcomes if not o.identified]
        if not wrong or prepared.rectified is None or len(evaluations) > rounds:
            break
        fix = next(v for v in truth if v.label == wrong[0])
        constraints.append(Constraint(fix.label, np.asarray(fix.position, float)))
        try:
            vertebrae = solve(prepared, options, constraints).vertebrae
        except VertebraIDError as exc:
            if refusals is not None:
                refusals.append(f"after {len(constraints)} correction(s): {exc}")
    return evaluations + [evaluations[-1]] * (rounds + 1 - len(evaluations))


def rounds_table(per_case: list[list], rounds: int) -> list[str]:
    lines = ["| corrections | identified | scans all correct |", "|---|---|---|"]
    for k in range(rounds + 1):
        summary = summarize([case[k] for case in per_case])
        lines.append(f"| {k} | {100 * summary.regions['all'].id_rate:.1f} % | {100 * summary.all_correct_rate:.0f} % |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--phantoms", type=int, default=50)
    parser.add_argument("--seed", type=int, default=2_000_000, help="first phantom seed (default: network_eval's test seeds)")
    parser.add_argument("--corrections", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/network/corrections.md"))
    args = parser.parse_args(argv)
    model = load_model(args.model, "cpu")
    options = EngineSettings().with_metadata(model.metadata)
    rounds = args.corrections

    phantom_rounds, refused = [], []
    for case_seed, truth, evidence, _ in predicted_phantoms(model, args.phantoms, args.seed):
        prepared = prepare(evidence, options)
        refusals: list[str] = []
        phantom_rounds.append(correction_rounds(prepared, truth, options, rounds, solve(prepared, options).vertebrae,
                                                refusals))
        refused += [f"phantom {case_seed}, {r}" for r in refusals]
        print(f"phantom {case_seed}: " + " -> ".join(str(e.num_identified) for e in phantom_rounds[-1])
              + f" of {phantom_rounds[-1][0].num_gt}", flush=True)

    real_rounds, real_rows = [], []
    for case in real_cases():  # the scans of bench/realct.py
        ct = read_image(case.image_path)
        case_options = options
        try:
            if is_bone_only(ct):  # as detect does: the skeleton's own bone, no network
                result = locate_in_skeleton(ct)
                prepared, case_options, automatic = result.prepared, result.prepared.settings, result.vertebrae
            else:
                prepared = prepare(predict_evidence(ct, model, "cpu"), options)
                automatic = solve(prepared, options).vertebrae
        except VertebraIDError as exc:  # refused by detect: nothing to correct
            real_rounds.append([evaluate_case([], case.truth)] * (rounds + 1))
            real_rows.append(f"| {case.name} | {case.truth[0].label}..{case.truth[-1].label} | refused: {exc} | | |")
            print(real_rows[-1], flush=True)
            continue
        refusals = []
        evaluations = correction_rounds(prepared, case.truth, case_options, rounds, automatic, refusals)
        refused += [f"{case.name}, {r}" for r in refusals]
        real_rounds.append(evaluations)
        offsets = name_offsets(automatic, case.truth)
        found = [o for o in offsets if o is not None]
        shifts = ", ".join(f"{k:+d}: {n}" for k, n in sorted(Counter(found).items())) or "-"
        real_rows.append(f"| {case.name} | {case.truth[0].label}..{case.truth[-1].label} | {len(found)} / {len(offsets)} | "
                         f"{shifts} | " + " → ".join(str(e.num_identified) for e in evaluations) + " |")
        print(real_rows[-1], flush=True)

    n_real = sum(e[0].num_gt for e in real_rounds)
    lines = [f"## Identification after corrections ({Path(args.model).name}, exact optimiser, the model's engine settings)",
             "", "Each round the user fixes the most cranial vertebra that is not identified (true label at its true centre)",
             "and re-labels; the rest is re-solved with the fixed points as hard constraints.", "",
             f"### {args.phantoms} held-out phantoms (seeds {args.seed}..{args.seed + args.phantoms - 1})", ""]
    lines += rounds_table(phantom_rounds, rounds)
    lines += ["", f"### Real scans of bench/realct.py, {n_real} vertebrae", ""]
    lines += rounds_table(real_rounds, rounds)
    lines += ["", "Before any correction: vertebrae that got a point (any name, mutually nearest, ≤ 20 mm) and by how many "
              "levels those points' names are off (negative: named too cranially); identified after 0..n corrections.", "",
              "| scan | truth | got a point | name off by (levels: vertebrae) | identified |", "|---|---|---|---|---|"]
    lines += real_rows
    lines += ["", f"Re-labels the engine refused (the labels stay as they were): {len(refused)}"]
    lines += [f"- {r}" for r in refused]
    report = "\n".join(lines)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
