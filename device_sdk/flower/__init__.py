"""Scale out with Flower (flwr 1.42, Message API): our device code in a ``ClientApp``, our server rules and round
policy in a ``ServerApp``.

- :mod:`.client_app`: ``app``, one device per Flower node (SuperNode or virtual node of the simulation engine);
- :mod:`.server_app`: ``app`` for ``flwr run`` (settings from the app's run config) and :func:`make_server_app` for a
  run in this process; :class:`~.server_app.CoMiGSStrategy` is the Flower strategy;
- :mod:`.launch`: ``simulate --engine flower`` (Flower's Ray simulation engine) and a SuperLink with SuperNodes on
  loopback (tests, benchmarks);
- :mod:`.wire`: record keys, tensors as ArrayRecords, the run's settings.

Needs the ``[flower]`` extra. Only the strategy's shared tensors (CoMiGS: attention LoRA and generalists) are ever
put in a message; specialists and routers stay on the device.
"""
