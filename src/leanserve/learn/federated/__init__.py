"""Federated rounds with Flower: a version trained further on data that never leaves its nodes.

- ``core``: the API (``federate`` in simulation, ``federate_deployed`` over the network, registering the result);
- ``server`` and ``client``: the Flower strategy and the node's training;
- ``app``, ``deploy``, ``proxy``, ``socket_patch``: a deployed federation (Flower's app project, SuperLink and
  SuperExec processes, leanserve's authenticated front, the start-up patch that points them at it).
"""
