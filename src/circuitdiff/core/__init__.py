"""The foundation every method builds on: the task and its positions, model loading, the
architecture adapter, head interventions, metrics, the circuit format and the run folder."""
