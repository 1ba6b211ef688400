"""Judges, metrics, single and sequential sweeps, reports and plots."""
