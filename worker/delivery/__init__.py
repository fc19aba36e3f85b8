"""The delivery side, in a worker's main process: messages taken off Redis, held in batch buffers
and leases, handed to the pool, and each acknowledged or put back once."""
