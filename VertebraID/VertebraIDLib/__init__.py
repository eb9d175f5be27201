"""VertebraIDLib: vertebra localisation and identification (Wang et al., CVPR 2021) in pure Python.

Imports no slicer, qt or ctk; the Slicer modules and the `vertebraid` command use it.
"""
__version__ = "0.1.0"
