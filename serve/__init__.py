"""The Ray Serve application and its config (`serve run serve/config.yaml`)."""
