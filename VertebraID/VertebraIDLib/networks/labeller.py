"""The level labeller: which vertebra is where, read from the CT straightened along the spine.

The heatmap network sees 38 cm of context per patch: enough to find every vertebra, but often
not enough to know which one it is (which is why its maps fire thoracic channels along most of
a spine). The labeller looks at the whole spine at once, cheaply:

1. the windowed CT (the heatmap network's own input grid) is resampled in the normal planes of
   the centreline (±96 mm around it, 4 mm samples, one plane per 4 mm of spine): a small,
   upright image of the spine, the same for any scan orientation;
2. a small 3-D CNN reads each plane's neighbourhood (vertebra shape, ribs, pelvis) and pools it
   to a feature vector per plane; a stack of dilated 1-D convolutions along the spine (a
   receptive field of the whole spine) turns them into 26 signals, one per level, each a
   Gaussian bump (σ 6 mm, height 1) where that level's body centre is;
3. those signals are added to the heatmap network's own 1-D signals (`Rectified.level_signals`),
   so the optimiser weighs both; positions still come from the heatmap network's Ĝ.

It trains on a CPU in minutes (`vertebraid train-labeller`, `training/labeller.py`): its input
per spine is ~49 x 49 x 100 samples, not a 3-D volume. Its weights file is named in the heatmap
model's metadata (`bundle.py`), so one `--model` brings both.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..engine.anatomy import NUM_CHANNELS
from ..engine.centerline import Centerline, polyline_centerline
from ..engine.rectify import StraightGrid
from ..engine.volume import Volume
from ..errors import VertebraIDError

LABELLER_FORMAT = "vertebraid-level-labeller"


@dataclass(frozen=True)
class LabellerConfig:
    """Architecture and sampling of a labeller (stored in the model metadata)."""

    half_width: int = 24  # plane samples either side of the centreline
    step_mm: float = 4.0  # along the spine and within the planes
    sigma_mm: float = 6.0  # width of the target bumps along the spine
    features: tuple = (16, 32, 64, 64)  # 3-D encoder filters (in-plane stride 2 but the last)
    hidden: int = 96  # 1-D channels along the spine
    dilations: tuple = (1, 2, 4, 8, 16, 32, 1, 2, 4, 8)
    # Windowed values below this read as 0 and the rest is stretched to [0, 1]: a bone-only view, the
    # same on phantoms and real CTs whatever their soft tissue looks like (0: the whole window)
    bone_floor: float = 0.0

    def __post_init__(self):
        try:
            features = tuple(int(f) for f in self.features)
            dilations = tuple(int(d) for d in self.dilations)
            ok = (int(self.half_width) >= 4 and float(self.step_mm) > 0 and float(self.sigma_mm) > 0
                  and len(features) >= 2 and min(features) >= 4 and int(self.hidden) >= 8
                  and int(self.hidden) % 8 == 0 and min(f % 4 for f in features) == 0
                  and len(dilations) >= 1 and min(dilations) >= 1 and 0.0 <= float(self.bone_floor) < 1.0)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise VertebraIDError("The level labeller's configuration is invalid (sizes must be positive whole numbers).")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "dilations", dilations)

    def to_dict(self) -> dict:
        """The configuration as stored in a model's metadata."""
        d = asdict(self)
        d["features"], d["dilations"] = list(self.features), list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "LabellerConfig":
        """A configuration from a model's metadata (unknown keys are an error)."""
        known = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or set(data) - known:
            raise VertebraIDError("The level labeller's configuration has unknown settings.")
        return cls(**data)


def build_labeller(config: LabellerConfig = LabellerConfig()):
    """(B, 1, X, Y, Z) straightened CT in [0, 1] -> (B, 26, Z) logits, one per level and plane."""
    import torch
    from torch import nn

    def conv3d(i, o, stride):
        return nn.Sequential(nn.Conv3d(i, o, 3, padding=1, stride=stride), nn.GroupNorm(4, o), nn.LeakyReLU(0.1))

    class LevelLabeller(nn.Module):
        def __init__(self):
            super().__init__()
            chans = (1,) + config.features
            self.encoder = nn.Sequential(*[
                conv3d(chans[i], chans[i + 1], (2, 2, 1) if i < len(config.features) - 1 else 1)
                for i in range(len(config.features))
            ])
            self.project = nn.Conv1d(2 * config.features[-1], config.hidden, 1)
            self.along = nn.ModuleList(
                nn.Sequential(nn.Conv1d(config.hidden, config.hidden, 3, padding=d, dilation=d),
                              nn.GroupNorm(8, config.hidden), nn.LeakyReLU(0.1))
                for d in config.dilations
            )
            self.head = nn.Conv1d(config.hidden, NUM_CHANNELS, 1)

        def forward(self, x):
            f = self.encoder(x)
            # max: a rib or the pelvis anywhere in the plane; mean: how much bone there is
            h = self.project(torch.cat([f.amax(dim=(2, 3)), f.mean(dim=(2, 3))], 1))
            for block in self.along:
                h = h + block(h)
            return self.head(h)

    return LevelLabeller()


# --------------------------------------------------------------------------- straightening


def bone_view(x: np.ndarray, config: LabellerConfig) -> np.ndarray:
    """The labeller's input from a straightened windowed CT: only bone, when `config.bone_floor` says so."""
    if config.bone_floor <= 0:
        return x
    return np.clip((x - config.bone_floor) / (1.0 - config.bone_floor), 0.0, 1.0).astype(np.float32)


def straighten_image(image: Volume, centerline: Centerline, config: LabellerConfig = LabellerConfig()) -> np.ndarray:
    """The windowed CT in the centreline's normal planes: (X, Y, Z) float32, 0 outside the scan."""
    if abs(centerline.step_mm - config.step_mm) > 1e-6:
        raise VertebraIDError(f"The level labeller needs a centreline sampled every {config.step_mm:g} mm, "
                              f"got {centerline.step_mm:g} mm.")
    return StraightGrid(centerline, config.half_width, config.step_mm).sample(image, order=1, cval=0.0)


# --------------------------------------------------------------------------- inference


def level_signals(network, image: Volume, centerline: Centerline, config: LabellerConfig, device=None) -> np.ndarray:
    """(Z, 26) signals on `centerline`'s samples: ~1 at each level's body centre, ~0 elsewhere.

    A centreline sampled at another step is read at the labeller's own and interpolated back.
    """
    import torch

    same_step = abs(centerline.step_mm - config.step_mm) < 1e-6
    line = centerline if same_step else polyline_centerline(centerline.points, config.step_mm)
    x = bone_view(straighten_image(image, line, config), config)
    device = device or next(network.parameters()).device
    with torch.inference_mode():
        logits = network(torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device))
    signals = torch.sigmoid(logits[0].float()).cpu().numpy().T.astype(np.float64)
    if same_step:
        return signals
    own = np.arange(len(line)) * config.step_mm
    wanted = np.arange(len(centerline)) * centerline.step_mm
    return np.stack([np.interp(wanted, own, signals[:, c]) for c in range(signals.shape[1])], axis=1)


