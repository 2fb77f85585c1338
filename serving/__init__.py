"""Serving: Triton Inference Server model repositories, a local server, clients.

This folder (``serving/`` in the repository) is installed as ``lp_deploy.serving``; it may
import the core, the runtimes and the exporters.
"""
