"""Files: atomic writes, response CSVs, vectors (.pt / .npy / Orbax), chat rendering, and
the multi-host rule that only process 0 writes."""
