"""The committee on real CometBFT v0.38: install check, network tooling, RPC client.

The ledger (:class:`~permamesh.committee.app.LedgerApp`) is served over ABCI by
``permamesh validator --engine cometbft``; a ``cometbft node`` next to it runs consensus.
This package starts such validators as a network and talks to their RPC.

| module | what | who calls it |
|---|---|---|
| ``binary.py`` | find the ``cometbft`` binary (``$PERMAMESH_COMETBFT``, ``.tools/bin``, ``PATH``) and check its pinned version | ``network``, tests |
| ``layout.py`` | one node's home: ``cometbft init``, genesis.json, config.toml edits, the kept ports (``node.json``) | ``network`` |
| ``network.py`` | ``CometNetConfig``, ``CometNet``: N app + node pairs, start, kill, stop, restart (``Devnet``'s API) | the runner, tests |
| ``drill.py`` | the corrupt-app drill hook (an env var the validator process reads) | ``validator._cometbft`` |
| ``answers.py`` | RPC answers checked field by field into frozen dataclasses | ``rpc`` |
| ``tls.py`` | the RPC's TLS: a certificate for the member's identity key; a client connection pinned to that key (``PinMismatch``) | ``rpc``, ``network``, ``committee.validator`` |
| ``rpc.py`` | ``CometRPC``: JSON-RPC over HTTPS pinned to the node's key (plain HTTP to loopback only), one kept-alive connection per node | ``link``, ``network``, ``runner`` |
| ``link.py`` | ``CometLink``: submit (broadcast, then wait for the commit), query, status, as the ``CommitteeClient`` expects | ``committee.client`` |
| ``runner.py`` | ``permamesh validator --cometbft N``: run a network, print blocks | ``committee.validator`` |

Dependencies point one way: ``link`` -> ``rpc`` -> ``answers``, ``tls``; ``network`` -> ``layout``,
``binary``, ``rpc``, ``tls``; endpoints are judged by :mod:`permamesh.committee.endpoints`;
nothing here imports the devnet.
"""
