"""fedaudit's Flower ClientApp: local training, with Opacus DP-SGD in private mode."""
