"""smartedit.engines: the runtimes an edit can run on, each a smartedit.graphs.GraphRunner, and the one table of
them (registry.py): eager PyTorch and the official baseline, CUDA graphs, ONNX Runtime, TensorRT, AOTInductor."""
