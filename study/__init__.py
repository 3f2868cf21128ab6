"""The Optuna side of mnist-study: presets and search spaces, the sampler, the objective,
storage, workers and the `mnist-study` command line."""
