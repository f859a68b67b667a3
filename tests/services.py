"""Real PostgreSQL and Redis for the cluster's tests: the benchmarks' throwaway servers
(bench/_common.py), started once per test module."""

from bench._common import Postgres, Redis, postgres_cluster, redis_server

__all__ = ["Postgres", "Redis", "postgres_cluster", "redis_server"]
