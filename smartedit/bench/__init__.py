"""smartedit.bench: `smartedit-bench` (run.py, cli.py) and the kernel benchmark (kernels.py); results/ holds runs."""
