"""smartedit.export: graph specs, export wrappers (one file per graph), LoRA merge, ONNX export and checks."""
