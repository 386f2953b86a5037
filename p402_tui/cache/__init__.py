"""The response cache: exact and semantic tiers (`semantic`), embedders (`embedders`)
and the vector index (`index`)."""
