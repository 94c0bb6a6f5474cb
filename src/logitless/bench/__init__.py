"""The `logitless bench` command: logitless against every peer, on the same inputs, in one run."""
