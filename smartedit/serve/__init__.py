"""smartedit.serve: the edit as a service on NVIDIA Triton Inference Server (smartedit-serve): the request rules and
batching (service.py), the Python-backend models Triton runs (model.py, stage.py), and the server (server.py)."""
