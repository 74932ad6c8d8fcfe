"""fleetscope collector: ingests agents' batches, stores them, and answers questions about the fleet."""
