"""smartedit.engines: the backends an edit can run on, and the one table of them (registry.py): eager PyTorch and the
official baseline, CUDA graphs, ONNX Runtime, TensorRT, AOTInductor. Loading a backend hands back the weights it
needs and its runner (a smartedit.graphs.GraphRunner), which SmartEditPipeline.on_backend puts in a pipeline.

Words: a backend is what `--backend` names; its runner is the object that runs the graphs; an engine is a TensorRT
plan only; the runtime is the C++ one (runtime/)."""
