"""The ``"onnxruntime"`` backend: ``model.onnx``, exported beside the program at capture.

``export`` (capture side: torch.onnx, checked with onnxruntime), ``scan`` (the protobuf walked before
onnxruntime opens it: no torch, no onnx import), ``session`` (the onnxruntime session and ``OrtModule``),
``serve`` (the backend row's module). Importing this package imports nothing; nothing but ``export``
imports torch.
"""
