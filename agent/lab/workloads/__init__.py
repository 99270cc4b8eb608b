"""Test workloads for the lab, tests, benchmarks and demo. Not part of the mesh itself."""
