"""The model.py that ``rexdeploy export triton --backend python`` writes (a file template, not imported)."""
