"""fedaudit's Flower ServerApp: strategies, the round loop, and the run store writer."""
