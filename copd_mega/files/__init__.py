"""Files every command shares: the run-directory lock and the disk-full test of a failed write."""
