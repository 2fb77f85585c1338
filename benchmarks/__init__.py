"""lp_deploy.benchmarks."""
