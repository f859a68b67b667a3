"""Real PostgreSQL for the cluster's tests: the benchmarks' throwaway cluster
(bench/_common.py), started once per test module."""

from bench._common import Postgres, postgres_cluster

__all__ = ["Postgres", "postgres_cluster"]
