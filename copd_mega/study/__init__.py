"""``copd study``: every mode x seed from one shared base, the report and its plots; the demo's
comparison table."""
