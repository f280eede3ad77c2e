"""smartedit.engines: runtimes behind one stage interface (base.StageBackend): eager PyTorch, ONNX Runtime."""
