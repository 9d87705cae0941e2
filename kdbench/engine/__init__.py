"""Engine: train and evaluate one trial (``run_trial``), with checkpoints and resume."""
