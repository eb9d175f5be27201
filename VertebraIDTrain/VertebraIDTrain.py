"""VertebraIDTrain: the headless 3D Slicer module that trains the VertebraID network.

Skeleton only. The training logic (MONAI network, data sets, the training loop, writing model
files as safetensors + JSON metadata) arrives with the network issue, in `VertebraIDLib`, so that
it runs from plain Python as well as from this module; this file will then gain a GUI-free
`VertebraIDTrainLogic` that calls it. Until then the module registers itself, hidden, so the
extension's layout (top-level CMakeLists.txt, one folder per module) is complete.
"""
try:  # only inside the 3D Slicer application
    from slicer.ScriptedLoadableModule import ScriptedLoadableModule
except ImportError:  # slicer-core or plain Python

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent


class VertebraIDTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VertebraID Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["VertebraID contributors"]
        self.parent.hidden = True  # nothing to show until the training logic lands
        self.parent.helpText = "Trains the network that the VertebraID module uses (not available yet)."
        self.parent.acknowledgementText = ""
