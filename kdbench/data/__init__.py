"""Data: locate a land-use dataset, scan it, split it, and load it as uint8 tensors.

The flow is ``get_spec -> locate_dataset -> scan_folder -> limit_per_class ->
load_images -> stratified_split``: :func:`kdbench.data.select.select_images` runs its
first steps and fingerprints the selection (without torch: the sweep driver plans with
it), :func:`kdbench.data.prepare.prepare_data` all of them for a
:class:`~kdbench.data.config.DataConfig` (its settings, checked by
:func:`~kdbench.data.config.check_data`).
"""
