"""smartedit.export: the producers of deployable artifacts: LoRA merge, then per target (targets.py) ONNX graphs,
TensorRT / TensorRT-RTX engines or AOTInductor packages, each checked against PyTorch; and smartedit-verify."""
