"""Hugging Face Hub IO: bundles and base models by repo id, publishing bundles. The only module that talks to a Hub."""
