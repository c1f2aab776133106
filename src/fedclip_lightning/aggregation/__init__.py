"""The server-side maths, below the algorithms: what a server does with the clients' rows.

- ``mean.py``: the weighted mean (FedAvg's rule), flat rows of a state dict, and ``aggregate_rows``;
- ``rows.py``: moving rows between processes (the only collectives);
- ``robust.py``: coordinate-wise median, trimmed mean, Krum, multi-Krum;
- ``server_opt.py``: server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) and the registry to add one;
- ``privacy.py``: client-level differential privacy (clipping, noise, the accountant);
- ``attacks.py``: simulated Byzantine clients;
- ``update.py``: :class:`ServerUpdate`, which composes them into one round's update.

Nothing here knows an algorithm, a client or a run: it imports only ``errors`` and the seeding helper.
"""
