"""The GPU check (check.py), split by part; eval/gpu/wheels.sh fetches what a device machine without a package index needs."""
