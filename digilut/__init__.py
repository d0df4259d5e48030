"""digilut: find lung-transplant rejection lesions on whole-slide images (DigiLut).

All logic lives in this package as plain typed functions; the CLI (`digilut.cli`) and the
Kubeflow components (`components/`) are thin layers over it.
"""

__version__ = "0.1.0"
