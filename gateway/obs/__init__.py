"""Observability: metrics, the access log and the scrape's team gauges. Recorded into from
every layer above the store, so it imports only the config."""
