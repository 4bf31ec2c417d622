"""ABCI 2.0 (CometBFT v0.38) bindings, framing, socket server and clients."""
