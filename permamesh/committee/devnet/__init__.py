"""The embedded devnet engine: Tendermint consensus among local validator processes."""
