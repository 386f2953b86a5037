"""Everything P402 remembers, in one SQLite file: the ledger, routing decisions,
agent sessions, provider health, gateway keys and the semantic cache's rows.

`store.Store` opens the file; `persistence.Persistence` is the orchestrator's hooks;
`sessions`, `queries` and `analytics` read and change what is kept.
"""
