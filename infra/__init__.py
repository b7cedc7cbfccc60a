"""Wiring: settings, connections, Redis key layout and the launchers of embedded services."""
