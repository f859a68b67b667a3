-- Numbering rows through one name on every backend: `tokentill_next_id('<sequence>')`.
-- In this file it is the sequence itself; a lake (warehouse/lake.py) has no sequences
-- and defines the same name over a PostgreSQL sequence of its catalog. Writers that need
-- the number back (a job run, an alert) take it first and insert it, since neither a
-- DuckLake table's INSERT nor its UPDATE has RETURNING.
CREATE MACRO tokentill_next_id(name) AS nextval(name);
