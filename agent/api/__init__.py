"""The operator's room: the HTTP API, its auth, overrides and the state store that keeps them."""
