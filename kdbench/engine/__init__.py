"""Engine: train and evaluate trials, alone or packed, with one runner (``runner.run_trials``), checkpoints and resume."""

# Part of every trial key (with kdbench.losses.LOSS_VERSION): bump it whenever a change to the
# training or evaluation code (loop, schedule, initialisation, batching, packing, data
# decoding, metrics) can change a trained model or its numbers, so stored results of the old
# code are never reused as if the new code had produced them.
RESULTS_VERSION = "3"  # 3: results as kdbench.records.TrialResult (kdbench-result-v2), fingerprints of file contents
