"""Supernets and everything that knows their topology.

``layers`` (width-sliced conv/BN/linear), ``arch`` (architecture specs, subnet ladders),
``registry`` (``create_model``), ``supernet`` (the ``DSSupernet`` base: gate, routing,
static/dynamic/grouped forwards), one module per family (``mbnet``, ``resnet``), and the
per-layer services every family implements: ``madds``, ``export``, ``masked``, ``pretrained``
and self-describing ``checkpoint`` files.
"""
