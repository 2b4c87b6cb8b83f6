"""Data for copd-mega: synthetic capabilities, the webdataset shard format, the per-branch reader.

See docs/data.md.
"""
