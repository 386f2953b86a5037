"""Several gateways on one database, as one fleet: a bus between them, and what travels on it.

`bus`: the interface (`publish(kind, payload)`, `subscribe(callback)`) and its SQLite form, a table
each process polls; `postgres`: the same over LISTEN/NOTIFY; `link`: what a gateway tells the others
(circuits it opened, answers it cached, decisions it made) and how it applies theirs.
"""
