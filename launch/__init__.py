"""Launchers for lmjax runs: local multi-process CPU, Cloud TPU VMs, GKE JobSets, SLURM.

Each launcher is a script (`python launch/NAME.py --help`) and an importable module.
"""
