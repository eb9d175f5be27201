"""Adult vertebral dimensions per level (millimetres), the phantom's anatomical reference.

Values are rounded means (to 0.5 mm) of adult male spines from direct and CT morphometry,
transcribed approximately from the tables of the sources below; a female spine is scaled by
`FEMALE_SCALE`. Sources (per column, by region):

- [P91c] Panjabi MM, Duranceau J, Goel V, Oxland T, Takata K. Cervical human vertebrae:
  quantitative three-dimensional anatomy of the middle and lower regions. Spine
  1991;16(8):861-869. (C3-C7: endplate width/depth, body height, canal, pedicles.)
- [P91t] Panjabi MM, Takata K, Goel V, et al. Thoracic human vertebrae: quantitative
  three-dimensional anatomy. Spine 1991;16(8):888-901. (T1-T12: endplate width/depth,
  anterior/posterior body height, canal width/depth, pedicle width/height, transverse
  process span, spinous process length.)
- [P92] Panjabi MM, Goel V, Oxland T, et al. Human lumbar vertebrae: quantitative
  three-dimensional anatomy. Spine 1992;17(3):299-306. (L1-L5, same columns.)
- [Z00] Zhou SH, McCarthy ID, McGregor AH, Coombs RRH, Hughes SPF. Geometrical dimensions of
  the lower lumbar vertebrae - analysis of data from digitised CT images. Eur Spine J
  2000;9:242-248. (L1-L5 body height and endplate size on CT; used to check [P92].)
- [T04] Tan SH, Teo EC, Chua HC. Quantitative three-dimensional anatomy of cervical, thoracic
  and lumbar vertebrae of Chinese Singaporeans. Eur Spine J 2004;13:137-146. (female/male
  ratio ~0.9 of widths and depths, ~0.95 of heights.)
- [G86] Gilad I, Nissan M. A study of vertebra and disc geometric relations of the human
  cervical and lumbar spine. Spine 1986;11(2):154-157. (disc heights, cervical and lumbar.)
- [P86] Pooni JS, Hukins DWL, Harris PF, Hilton RC, Davies KE. Comparison of the structure of
  human intervertebral discs in the cervical, thoracic and lumbar regions of the spine. Surg
  Radiol Anat 1986;8:175-182. (thoracic discs 4-8 mm, thickening caudally.)
- [D94] Doherty BJ, Heggeness MH. The quantitative anatomy of the atlas. Spine
  1994;19(22):2497-2500. (C1 ring size.)
- [H93] Heggeness MH, Doherty BJ. The trabecular anatomy of the axis. Spine 1993;18:1945-1949
  and Nucci RC et al. Computed tomographic evaluation of the normal adult odontoid. Spine
  1995;20:264-270 (dens ~10 mm wide, ~15 mm above the C2 body).
- Sacrum: S1 body width/depth from [Z00]-style CT series (S1 upper endplate ~48 x 33 mm);
  S2-S5 shrinking segments.

Columns: body width (upper endplate, transverse), body depth (upper endplate, sagittal),
anterior and posterior body height, disc height below the level (mean of anterior and
posterior), canal width and depth, pedicle width (transverse) and height, transverse process
tip-to-tip span, spinous process length (from the canal's posterior border to its tip).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

#: Ratio of female to male dimensions (widths/depths, heights), from [T04].
FEMALE_SCALE = (0.90, 0.95)


@dataclass(frozen=True)
class LevelDims:
    """Body and canal dimensions (mm) of one level, for one patient size."""

    width: float
    depth: float
    height_ant: float
    height_post: float
    disc_below: float
    canal_width: float
    canal_depth: float
    pedicle_width: float
    pedicle_height: float
    tp_span: float
    spinous_length: float

    @property
    def height(self) -> float:
        return 0.5 * (self.height_ant + self.height_post)

    def scaled(self, lateral: float, vertical: float) -> "LevelDims":
        """Dimensions scaled by `lateral` (widths, depths, lengths) and `vertical` (heights)."""
        return LevelDims(
            width=self.width * lateral,
            depth=self.depth * lateral,
            height_ant=self.height_ant * vertical,
            height_post=self.height_post * vertical,
            disc_below=self.disc_below * vertical,
            canal_width=self.canal_width * (0.5 + 0.5 * lateral),  # the canal varies less
            canal_depth=self.canal_depth * (0.5 + 0.5 * lateral),
            pedicle_width=self.pedicle_width * lateral,
            pedicle_height=self.pedicle_height * vertical,
            tp_span=self.tp_span * lateral,
            spinous_length=self.spinous_length * lateral,
        )


def _row(*values) -> LevelDims:
    return LevelDims(*[float(v) for v in values])


#            width depth  h_ant h_post disc  canW  canD  pedW  pedH  TPspan SPlen
PUBLISHED = {
    # C1: no body; width/depth are the ring's outer size [D94], height the lateral masses.
    "C1": _row(78.0, 45.0, 14.0, 14.0, 0.0, 28.0, 30.0, 8.0, 8.0, 78.0, 12.0),
    # C2: the body below the dens [H93]; disc C2-C3 [G86].
    "C2": _row(17.0, 15.5, 15.0, 15.0, 4.5, 24.0, 15.0, 7.0, 8.0, 56.0, 30.0),
    "C3": _row(16.0, 15.5, 11.5, 11.5, 4.5, 23.5, 14.5, 5.5, 7.0, 52.0, 18.0),  # [P91c]
    "C4": _row(16.5, 15.5, 11.3, 11.3, 5.0, 24.0, 14.5, 5.5, 7.0, 54.0, 18.0),
    "C5": _row(17.5, 16.0, 11.0, 11.0, 5.0, 24.5, 14.5, 5.8, 7.0, 55.0, 20.0),
    "C6": _row(19.0, 16.5, 11.2, 11.2, 5.0, 24.5, 14.5, 6.0, 7.0, 58.0, 24.0),
    "C7": _row(21.0, 17.0, 13.0, 13.5, 4.5, 24.0, 14.5, 6.5, 7.5, 70.0, 35.0),
    "T1": _row(25.5, 16.5, 14.5, 15.5, 4.0, 20.5, 15.0, 8.0, 9.5, 78.0, 38.0),  # [P91t]
    "T2": _row(26.5, 18.0, 15.5, 16.5, 4.0, 17.5, 15.0, 6.5, 11.0, 73.0, 40.0),
    "T3": _row(27.0, 20.0, 16.0, 17.0, 4.2, 16.5, 15.0, 5.5, 11.5, 70.0, 40.0),
    "T4": _row(27.5, 22.0, 16.5, 17.5, 4.5, 16.0, 15.0, 5.0, 11.5, 68.0, 40.0),
    "T5": _row(28.5, 24.0, 17.0, 18.0, 4.5, 16.0, 15.0, 5.0, 11.5, 67.0, 40.0),
    "T6": _row(29.5, 25.5, 17.5, 18.5, 4.8, 16.0, 15.0, 5.0, 12.0, 66.0, 40.0),
    "T7": _row(30.5, 26.5, 18.0, 19.0, 5.0, 16.0, 15.0, 5.2, 12.0, 65.0, 38.0),
    "T8": _row(31.5, 27.5, 19.0, 20.0, 5.2, 16.0, 15.5, 5.8, 13.0, 64.0, 36.0),
    "T9": _row(33.0, 28.5, 19.5, 20.5, 5.5, 16.5, 15.5, 6.2, 14.0, 62.0, 35.0),
    "T10": _row(35.0, 29.5, 20.5, 21.5, 6.0, 17.0, 16.0, 6.8, 15.0, 58.0, 33.0),
    "T11": _row(38.0, 30.5, 21.5, 22.5, 7.0, 18.0, 16.5, 7.8, 16.0, 53.0, 32.0),
    "T12": _row(40.0, 32.0, 22.5, 23.5, 8.0, 20.0, 17.0, 8.0, 16.0, 50.0, 32.0),
    "L1": _row(42.0, 33.5, 24.5, 26.0, 9.5, 22.0, 17.5, 8.5, 15.5, 72.0, 33.0),  # [P92], [Z00]
    "L2": _row(44.0, 34.5, 25.5, 26.5, 10.5, 22.5, 17.0, 9.0, 15.0, 80.0, 33.0),
    "L3": _row(46.0, 35.5, 26.5, 26.5, 11.0, 23.0, 16.5, 10.5, 14.5, 90.0, 32.0),
    "L4": _row(48.0, 36.0, 27.0, 26.0, 11.5, 23.5, 17.0, 12.5, 14.0, 88.0, 30.0),
    "L5": _row(50.0, 35.5, 28.5, 24.5, 11.0, 25.0, 17.5, 16.0, 14.0, 88.0, 25.0),
    # Sacral segments: S1 like a wide lumbar body; the rest shrink (fused, no discs).
    "S1": _row(50.0, 33.0, 28.0, 26.0, 0.0, 28.0, 14.0, 0.0, 0.0, 100.0, 15.0),
    "S2": _row(36.0, 25.0, 24.0, 22.0, 0.0, 24.0, 10.0, 0.0, 0.0, 80.0, 12.0),
    "S3": _row(28.0, 20.0, 20.0, 18.0, 0.0, 20.0, 8.0, 0.0, 0.0, 60.0, 10.0),
    "S4": _row(22.0, 15.0, 16.0, 15.0, 0.0, 16.0, 6.0, 0.0, 0.0, 40.0, 8.0),
    "S5": _row(16.0, 11.0, 13.0, 12.0, 0.0, 12.0, 5.0, 0.0, 0.0, 28.0, 6.0),
}

# Transitional levels borrow their neighbours' sizes.
PUBLISHED["T13"] = replace(PUBLISHED["T12"], width=41.0, depth=32.5, height_ant=23.5, height_post=24.5, disc_below=8.5)
PUBLISHED["L6"] = replace(PUBLISHED["L5"], width=51.0, height_ant=28.0, height_post=25.0, disc_below=10.5)


def level_dims(label: str) -> LevelDims:
    """Published adult male dimensions of a level (C1..C7, T1..T13, L1..L6, S1..S5)."""
    return PUBLISHED[label]
