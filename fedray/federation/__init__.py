"""The federation: a hospital (client), the round loop (coordinator), the Ray edge (runtime),
what crosses the wire (messages) and the named fault points (faults)."""
