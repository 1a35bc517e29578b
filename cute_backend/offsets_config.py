"""What the splits_to_offsets host side (offsets.py) and its device code (offsets_kernel.py) share."""

MAX_OUTPUTS = 8  # outputs one launch writes; more take several launches (grouped.offsets)
THREADS = 256  # threads of the one CTA
