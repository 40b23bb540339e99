"""The few FedML 0.9.6 constants the stand-in needs (same values)."""

FEDML_TRAINING_PLATFORM_SIMULATION = "simulation"
FEDML_TRAINING_PLATFORM_CROSS_SILO = "cross_silo"
FEDML_SIMULATION_TYPE_SP = "sp"
