"""Diff-ST: super-resolved spatial transcriptomics with a cross-modal conditional diffusion model.

Importing :mod:`diffst` has no side effects: it sets no environment variable, selects no matplotlib
backend and loads no heavy dependency. Process-wide settings (e.g. ``OMP_WAIT_POLICY``) are made by
the entry points that start work: the ``diffst`` command and ``python -m diffst.training``.
"""

# The one version string of the package: pyproject.toml reads it from here
# ([tool.setuptools.dynamic] version = {attr = "diffst.__version__"}).
__version__ = "0.1.0"
