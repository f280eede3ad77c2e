"""smartedit.serve: the edit as a service on NVIDIA Triton Inference Server (smartedit-serve): the serving contract
(repository.py), the request rules and batching (service.py), the Python-backend models Triton runs (model.py,
graph_model.py), the server (server.py, admin.py, drain.py), and its deployment on Kubernetes (kubernetes.py)."""
