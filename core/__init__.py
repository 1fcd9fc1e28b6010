"""svcproxy: a pluggable Kubernetes service proxy (IPVS first, iptables fallback).

Plugins import their marker from here::

    from svcproxy import hookimpl
"""

from .hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl", "hookspec"]
