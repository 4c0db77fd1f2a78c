"""Integrations installed as ``kalm_store.plugins``: the LanceDB query hook and the Ray bulk builder."""
