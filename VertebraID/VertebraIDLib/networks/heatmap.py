"""The heatmap network of paper §3.1: a MONAI 3-D U-Net from the windowed CT to 26 maps.

- MONAI's DynUNet (the nnU-Net architecture): 3x3x3 kernels, instance norm, leaky ReLU; four
  levels with filters (16, 32, 64, 128) and strides (1, 2, 2, 2) by default. The paper regresses
  26 Gaussian maps with an L2 loss; a plain linear output (no activation) does that. Small on
  purpose (~1.2 M parameters): with 4 mm voxels and 96^3 patches (38 cm of context, enough to
  see several vertebrae and the ribs or pelvis that name them) it trains on a CPU.
- MONAI's BasicUNet is the alternative (`kind = "basicunet"`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..engine.anatomy import NUM_CHANNELS
from ..errors import VertebraIDError

NETWORK_KINDS = ("dynunet", "basicunet")


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of the heatmap network (stored in every model file's metadata)."""

    kind: str = "dynunet"
    channels: tuple = (16, 32, 64, 128)  # filters per level; len = number of levels
    in_channels: int = 1
    out_channels: int = NUM_CHANNELS
    dropout: float = 0.0

    def __post_init__(self):
        if self.kind not in NETWORK_KINDS:
            raise VertebraIDError(f"Unknown network kind '{self.kind}'; choose {' or '.join(NETWORK_KINDS)}.")
        try:
            channels = tuple(int(c) for c in self.channels)
        except (TypeError, ValueError):
            raise VertebraIDError(f"Network channels must be whole numbers, got {self.channels!r}.") from None
        if len(channels) < 3 or min(channels) < 1:
            raise VertebraIDError("A network needs at least 3 levels of positive channel counts.")
        if self.kind == "basicunet" and len(channels) != 6:
            raise VertebraIDError("MONAI's BasicUNet takes exactly 6 channel counts.")
        object.__setattr__(self, "channels", channels)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise VertebraIDError(f"Dropout must be in [0, 1), got {self.dropout}.")

    @property
    def downsampling(self) -> int:
        """Patch sizes must be multiples of this."""
        return 2 ** (len(self.channels) - 1) if self.kind == "dynunet" else 16

    def to_dict(self) -> dict:
        """The configuration as stored in a model's metadata."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "NetworkConfig":
        """A configuration from a model's metadata (unknown keys are an error)."""
        if not isinstance(data, dict):
            raise VertebraIDError("The network configuration must be a table of settings.")
        known = {"kind", "channels", "in_channels", "out_channels", "dropout"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VertebraIDError(f"Unknown network setting '{unknown[0]}'; known: {', '.join(sorted(known))}.")
        return cls(**data)


def build_network(config: NetworkConfig = NetworkConfig()):
    """A MONAI 3-D U-Net: (B, 1, X, Y, Z) windowed CT -> (B, 26, X, Y, Z) Gaussian maps."""
    if config.kind == "basicunet":
        from monai.networks.nets import BasicUNet

        return BasicUNet(3, config.in_channels, config.out_channels, features=config.channels, dropout=config.dropout)
    from monai.networks.nets import DynUNet

    levels = len(config.channels)
    return DynUNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        kernel_size=[3] * levels,
        strides=[1] + [2] * (levels - 1),
        upsample_kernel_size=[2] * (levels - 1),
        filters=list(config.channels),
        dropout=config.dropout or None,
        norm_name=("INSTANCE", {"affine": True}),
        res_block=True,
    )


def count_parameters(network) -> int:
    """Number of trainable and fixed parameters of a network."""
    return int(sum(p.numel() for p in network.parameters()))
