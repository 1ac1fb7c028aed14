"""Drains an Azure VM from its load balancer before scheduled maintenance."""

__version__ = "0.1.0"
