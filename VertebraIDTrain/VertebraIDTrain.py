"""VertebraIDTrain: the headless 3D Slicer module that trains the VertebraID network.

The training itself lives in `VertebraIDLib.training` (plain Python, also `vertebraid train`);
this module's GUI-free Logic calls it, so the same run works inside Slicer:

    Slicer --no-main-window --python-script VertebraIDTrain/VertebraIDTrain.py -- CONFIG [--resume]

Like VertebraID.py, the file imports without the Slicer application (slicer-core or plain
Python): the scripted-module base classes are replaced by plain stand-ins there. It needs
3D Slicer 5.10 or later (Python 3.10+); an older Slicer gets one sentence saying so.
What training needs (torch, MONAI, safetensors, tqdm, TensorBoard) is checked as a whole
before any work (`VertebraIDLib.slicer.requirements.TRAINING_REQUIREMENTS`).
"""
from __future__ import annotations

import logging
import os
import sys

MINIMUM_SLICER_VERSION = "5.10"  # as VertebraID.py: the first 3D Slicer with Python >= 3.10
PYTHON_SUPPORTED = tuple(sys.version_info[:2]) >= (3, 10)
UNSUPPORTED_MESSAGE = (
    f"VertebraID Train needs 3D Slicer {MINIMUM_SLICER_VERSION} or later (Python 3.10 or later), but this 3D Slicer "
    f"runs Python {sys.version_info[0]}.{sys.version_info[1]}: please install a newer 3D Slicer."
)

if PYTHON_SUPPORTED:
    try:
        import VertebraIDLib  # noqa: F401
    except ImportError:  # a source checkout: VertebraIDLib sits in the VertebraID module folder
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "VertebraID"))

    from VertebraIDLib.errors import VertebraIDError
    from VertebraIDLib.slicer import requirements
else:
    logging.error(UNSUPPORTED_MESSAGE)

    class VertebraIDError(Exception):
        pass

try:  # only inside the 3D Slicer application
    import qt  # noqa: F401
    from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic

    HAVE_SLICER_APP = True
except ImportError:  # slicer-core or plain Python
    HAVE_SLICER_APP = False

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass


class VertebraIDTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VertebraID Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["VertebraID contributors"]
        self.parent.hidden = True  # headless: run with --no-main-window --python-script
        if not PYTHON_SUPPORTED:
            self.parent.helpText = UNSUPPORTED_MESSAGE
            return
        self.parent.helpText = (
            "Trains the heatmap network that the VertebraID module uses, from a configuration file "
            "(see VertebraIDTrain/configs/). Run: Slicer --no-main-window --python-script "
            "VertebraIDTrain.py -- CONFIG [--resume]."
        )
        self.parent.acknowledgementText = "Wang et al., CVPR 2021; MONAI."


class VertebraIDTrainLogic(ScriptedLoadableModuleLogic):
    """Train from a configuration (a path or a `training.config.TrainConfig`); no GUI, no scene."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleLogic.__init__(self, parent)

    @staticmethod
    def missing_packages() -> list[str]:
        """The Python packages training needs that are missing or too old (the whole list at once)."""
        return [r.module for r in requirements.missing(requirements.TRAINING_REQUIREMENTS)]

    def check(self) -> None:
        """One sentence naming every package training lacks (torch, monai, safetensors, tqdm, tensorboard)."""
        if not PYTHON_SUPPORTED:
            raise VertebraIDError(UNSUPPORTED_MESSAGE)
        requirements.check(requirements.TRAINING_REQUIREMENTS, "Training", "",
                           requirements.install_advice(requirements.TRAINING_REQUIREMENTS))

    def train(self, config, resume: bool = False, progress=None, **overrides):
        """Run `training.heatmap.train`; `overrides` set top-level settings (output_dir, device...)."""
        self.check()
        from VertebraIDLib.training.config import TrainConfig, load_config, validate_config
        from VertebraIDLib.training.heatmap import train

        if not isinstance(config, TrainConfig):
            config = load_config(config)
        for key, value in overrides.items():
            if not hasattr(config, key) or key in ("model", "data", "augment", "train", "validation"):
                raise VertebraIDError(f"Unknown top-level training setting '{key}'.")
            setattr(config, key, value)
        validate_config(config)
        return train(config, resume=resume, progress=progress, show_progress=not HAVE_SLICER_APP)

    def train_labeller(self, model_path, samples, phantoms: int = 2000, minutes: float = 30.0, attach: bool = False,
                       log=print, labelmaps=(), renders: int = 300, fine_tune: bool = False):
        """Train the level labeller for a heatmap model on phantoms and, when `labelmaps` are given, on CTs
        rendered from them (`training.labeller.train_for_model`); returns its path."""
        self.check()
        from VertebraIDLib.training.labeller import train_for_model

        return train_for_model(model_path, samples, phantoms, minutes, attach=attach, log=log,
                               labelmaps=labelmaps, renders=renders, fine_tune=fine_tune)[0]


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="VertebraIDTrain", description="Train the VertebraID heatmap network.")
    parser.add_argument("config", help="training configuration (.toml or .json)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = parser.parse_args(argv)
    try:
        result = VertebraIDTrainLogic().train(args.config, resume=args.resume)
    except VertebraIDError as exc:
        print(f"VertebraIDTrain: error: {exc}", file=sys.stderr)
        return 2
    print(f"model -> {result.model_path}")
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if HAVE_SLICER_APP:
        import slicer

        slicer.util.exit(code)
    else:
        sys.exit(code)
