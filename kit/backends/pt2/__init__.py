"""The ``"torch"`` backend: ``model.pt2``, a ``torch.export`` archive.

``grammar`` (program text held to a grammar) < ``checks`` (in kit.backends) < ``archive`` (the zip and its
entries checked, tensors mapped) < ``program`` (``ExportedForward``) < ``dtypes`` < ``fx_build`` (the graph
built from the checked JSON) < ``load`` (``load_program``) < ``serve`` (the backend row's module). Each imports
only those before it. Importing this package imports nothing.
"""
