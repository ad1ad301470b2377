"""Side-by-side benchmarks of fastmtt against eager, compiled and third-party implementations."""
