"""Interpretability analyses of LALMs on SAKE-format data (python analyze.py lens|trace)."""
